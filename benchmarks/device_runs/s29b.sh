# Session 29: SDXL nested S vs bf16 compile (the 1.2x bar with session 25's wave rule; ~7 min)
bash .whl/s28a.sh
