"""The EC2 operations the plugin needs, the instance model and its tags, and where
this master is reached. No fleet or buildbot imports."""
