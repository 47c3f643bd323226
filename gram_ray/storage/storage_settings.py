"""How hard every process of a job tries storage: StorageSettings, from a config's storage section or the
environment the way AWS tools read it, applied with configure()."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace

__all__ = [
    "StorageSettings",
    "RETRY_MODES",
    "SETTINGS_ENV",
    "settings",
    "configure",
    "on_configure",
]


_ON_CONFIGURE: list = []  # what to reset when the settings change


@dataclass(frozen=True)
class StorageSettings:
    """How hard gram-ray tries before a storage fault ends a job. The defaults are for training runs of hours on
    spot nodes: a minute's outage is ridden out (tested: docs/faults.md)."""

    max_attempts: int = 5  # tries of one request, the first included (AWS_MAX_ATTEMPTS); ~7 s of backoff
    retry_mode: str = "standard"  # the AWS SDK's backoff: standard (random, up to 2^n s, 20 s at most) or legacy
    connect_timeout_s: float = 10.0  # a connection not made by then is a failed try
    request_timeout_s: float = 60.0  # a response silent for this long is a failed try
    outage_s: float = 120.0  # how long one operation keeps trying past max_attempts before the job ends

    def __post_init__(self) -> None:
        if self.retry_mode not in RETRY_MODES:
            raise ValueError(f"storage retry_mode {self.retry_mode!r} is not one of {', '.join(RETRY_MODES)}")
        if self.max_attempts < 1:
            raise ValueError(f"storage max_attempts must be 1 or more (got {self.max_attempts})")
        for name in ("connect_timeout_s", "request_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"storage {name} must be more than 0 (got {getattr(self, name)})")
        if self.outage_s < 0:
            raise ValueError(f"storage outage_s must be 0 or more (got {self.outage_s})")

    @classmethod
    def from_env(cls, env=None) -> StorageSettings:
        """The settings the environment gives (SETTINGS_ENV), the defaults for the rest; a bad value is an error
        naming its variable."""
        env = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            raw = env.get(SETTINGS_ENV[f.name])
            if raw is None or raw == "":
                continue
            try:
                values[f.name] = raw.lower() if f.name == "retry_mode" else type(getattr(cls, f.name))(raw)
            except ValueError:
                raise ValueError(f"{SETTINGS_ENV[f.name]}={raw!r} is not a valid {f.type}") from None
        if values.get("retry_mode") == "adaptive":  # the AWS SDKs' client-side rate limiting: pyarrow has none
            values["retry_mode"] = "standard"
        try:
            return cls(**values)
        except ValueError as e:
            raise ValueError(f"{e} (from the environment: {', '.join(SETTINGS_ENV.values())})") from None

    @classmethod
    def of(cls, section) -> StorageSettings:
        """The settings of a config's storage section (config.StorageConfig): its keys, then the environment's,
        then the defaults."""
        return replace(cls.from_env(), **section.chosen())

    def env(self) -> dict[str, str]:
        """These settings as environment variables, for this process and the Ray workers it starts."""
        return {SETTINGS_ENV[k]: str(v) for k, v in asdict(self).items()}


RETRY_MODES = ("standard", "legacy", "adaptive")


SETTINGS_ENV = {
    "max_attempts": "AWS_MAX_ATTEMPTS",
    "retry_mode": "AWS_RETRY_MODE",
    "connect_timeout_s": "GRAM_RAY_STORAGE_CONNECT_TIMEOUT_S",
    "request_timeout_s": "GRAM_RAY_STORAGE_REQUEST_TIMEOUT_S",
    "outage_s": "GRAM_RAY_STORAGE_OUTAGE_S",
}


def settings() -> StorageSettings:
    """This process's storage settings: its environment's (configure() sets them), else the defaults."""
    return StorageSettings.from_env()


def configure(chosen: StorageSettings) -> None:
    """Make these the settings of this process and of the Ray workers it starts afterwards (they inherit the
    environment, and FORWARDED_ENV carries them to other nodes). What was built or learnt under the old ones is
    dropped (filesystems.py's clients, retries.py's memory of an outage)."""
    os.environ.update(chosen.env())
    for reset in _ON_CONFIGURE:
        reset()


def on_configure(reset) -> None:
    """Call reset() whenever the settings change (configure)."""
    _ON_CONFIGURE.append(reset)
