"""The one training loop and every mechanism the tasks share; docs/engine.md lists which module owns what."""
