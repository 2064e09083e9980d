"""The user-data protocol and what master and image say to each other. Pure: no I/O,
no buildbot, no boto3."""
