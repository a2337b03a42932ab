from eglp_dist.cli import entry

entry()
