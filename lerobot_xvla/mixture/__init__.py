"""Cross-embodiment training: one X-VLA on a weighted mixture of LeRobot datasets, one domain per robot."""
