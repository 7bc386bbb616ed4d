"""Testing helpers for stargate users: private Redis servers for tests."""
