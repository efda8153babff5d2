"""Small scripted agents that tests run in real job processes (imported by the child)."""
