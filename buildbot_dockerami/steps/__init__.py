"""Build steps the plugin provides (buildbot glue, beside worker/)."""
