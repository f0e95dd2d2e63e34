"""The errors a user can cause and fix: each one line, `<what is wrong>; <how to fix it>`.

`experiment.run` prints a `UserError` as `error: <message>` and exits with status 2, without a
traceback; any other exception is a bug in rlhf_jax and keeps its traceback. All of them
subclass ValueError, so code that catches ValueError keeps working.

  ConfigError       a config value, override or combination that cannot run
  DataError         a bad input file or record (rlhf_jax.data.records; names file/record/field)
  CheckpointError   a checkpoint that is missing, damaged or belongs to another run
"""


class UserError(ValueError):
    """A problem in what the user gave (config, files, checkpoints), not in rlhf_jax."""


class ConfigError(UserError):
    """A config value or combination that cannot run; the message says what to change."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, damaged, or written by a different run."""
