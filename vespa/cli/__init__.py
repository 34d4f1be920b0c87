"""The command line: the launcher, the account API, Vast's deployments, replay."""
