"""Test-only stand-ins and builders (never imported by the pack): tiny models in the layouts real loaders produce."""
