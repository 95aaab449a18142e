"""Errors that are the user's to fix: reported as one clear message, without a traceback."""


class UserError(Exception):
    pass
