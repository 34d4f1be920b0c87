"""What Vespa shows of itself: health, metrics and the request log, mitmweb's comments and views."""
