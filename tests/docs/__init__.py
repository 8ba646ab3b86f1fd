"""Tests of the docs site, the README snippets and the set-up script."""
