# Vespa as a service: the proxy for one endpoint, keys from the environment or a mounted secret.
#   docker build -t vespa .
#   docker run --rm -p 127.0.0.1:8010:8010 -e VAST_ENDPOINT=my-endpoint -e VAST_ACCOUNT_KEY vespa
# More in README.md ("Run it in a container").

FROM python:3.13-slim AS build
WORKDIR /src
COPY pyproject.toml README.md vespa_addon.py ./
COPY vespa ./vespa
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.13-slim
# VESPA_PORT is the port the proxy listens on inside the container, for the entry script and the
# HEALTHCHECK alike: with --network host it must differ from 8010 when that is taken.
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 VESPA_PORT=8010
COPY --from=build /wheels /wheels
# Every dependency ships a wheel for this Python, or is pure Python (pyperclip): no compiler needed.
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && groupadd --gid 10001 vespa \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin vespa
COPY scripts/container-entry.sh /usr/local/bin/vespa-container-entry
# mitmproxy keeps its own CA in ~/.mitmproxy, Vespa the worker CA in ~/.cache/vespa: both in
# this user's home, nothing as root.
USER 10001:10001
WORKDIR /home/vespa
EXPOSE 8010
# Ready means the proxy can route: /_vespa/health answers 503 when the autoscaler is unreachable.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/_vespa/health' % os.environ['VESPA_PORT'], timeout=4)"]
# 0.0.0.0: inside the container, or the published port could not reach the proxy. It is reachable
# only where `docker run -p` publishes it (the README publishes on the host's 127.0.0.1 only).
# In ENTRYPOINT rather than CMD so that `docker run IMAGE --instance alpha` keeps it.
ENTRYPOINT ["vespa-container-entry", "--host", "0.0.0.0"]
CMD []
