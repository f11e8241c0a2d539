"""Fixtures shared by the multi-user integration tests (see tests/helpers/users.py)."""

from tests.helpers.users import shared_dir, users

__all__ = ["shared_dir", "users"]
