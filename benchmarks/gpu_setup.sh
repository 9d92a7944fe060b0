# Sourced by the device-machine scripts (benchmarks/gpu_session.sh, training/gpu_train.sh),
# from the repository root: makes `python3 -c "import dds_fast"` work on the GPU image, which
# has torch and Triton but no package registry. Wheels carried in .whl/ are installed first
# (pypng, which the image lacks, for the 16-bit PNG tests).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# python3 -m pip: a bare `pip` there can belong to another Python than the one with torch
python3 -m pip install --quiet --no-deps --no-build-isolation -e . || echo "editable install failed"
if ! python3 -c "import dds_fast.kernels.conv2d, dds_fast.training.data"; then
  # no editable install (it failed on 2026-11-25, before pyproject.toml declared the build
  # backend): map the subpackages in this copy and import the package from here
  ln -sfn ../kernels dds_fast/kernels && ln -sfn ../training dds_fast/training
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  python3 -c "import dds_fast.kernels.conv2d, dds_fast.training.data" || exit 1
fi
