"""The engine's own exceptions: one hierarchy, each message names the problem."""


class EagleError(Exception):
    """Base of every error the engine raises on purpose."""


class ModelLoadError(EagleError):
    """A model directory or file is missing or unreadable."""


class UnsupportedModelError(EagleError):
    """The checkpoint's architecture or one of its options is not implemented, or a config field has the wrong
    type or lies outside its range (the message names the file and the field)."""


class CheckpointMismatchError(EagleError):
    """A checkpoint's tensors do not fit its config (missing, unexpected or misshapen weights)."""


class NonFiniteWeightsError(CheckpointMismatchError):
    """A checkpoint tensor holds NaN or infinite values (or overflows the dtype it is loaded in)."""


class DraftMismatchError(EagleError):
    """A draft head does not fit its target model (hidden size, vocabulary, head dims)."""


class InvalidRequestError(EagleError, ValueError):
    """A generation request is malformed: empty prompt, bad token id, bad sampling parameter, too long."""


class InvalidDeviceError(EagleError, ValueError):
    """A device that is malformed, of an unsupported type, or not present on this machine."""


class TrainingInputError(EagleError, ValueError):
    """A training job's inputs are unusable: empty corpus, bad settings, unwritable output."""
