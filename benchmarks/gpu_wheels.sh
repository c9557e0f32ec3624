# Sourced by the GPU scripts: installs the wheels carried in .whl/ (machines without network;
# `pip download` them elsewhere) into /tmp/site and puts it on PYTHONPATH. Needs $PY.
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  echo "== installing carried wheels: $(ls .whl)"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
