"""Vespa as a mitmproxy script: `mitmdump -s vespa_addon.py --mode reverse:https://run.vast.ai ...`."""

from vespa.proxy.addon import Vespa

addons = [Vespa()]
