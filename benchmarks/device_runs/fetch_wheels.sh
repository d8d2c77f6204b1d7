# The wheels the device scripts install (the GPU machine has torch 2.11 + triton 3.6 but no diffusers / mip), for
# Python 3.12, into the git-ignored .whl/ (run here, in the repository root; the device tool carries .whl)
set -e
mkdir -p .whl
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
for package in diffusers==0.42.1 mip==2.0.0 cffi pycparser highsbox nvidia-cudnn-frontend==1.14.1; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
    -d .whl "$package"
done
cp benchmarks/device_runs/*.sh .whl/
