"""The settings: each declared once, and every validator checkconfig and a launch use."""
