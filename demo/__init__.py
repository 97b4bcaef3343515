"""Demo and test fixtures: tiny real-architecture models and the headless demo run."""
