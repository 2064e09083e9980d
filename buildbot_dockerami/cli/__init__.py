"""The ``buildbot-dockerami`` command: images, the demo, the user-data preview."""
