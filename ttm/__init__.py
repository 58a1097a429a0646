"""ssm-ttm-bench: the shared text-to-music harness."""

__version__ = "0.1.0"
