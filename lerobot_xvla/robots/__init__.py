"""Robots X-VLA drives: the SO101 arm's model and kinematics, and the processor steps that put it in end-effector space."""
