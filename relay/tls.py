"""What every sink's connection settings share: TLS (a CA, a client certificate for mTLS) and
one rule for secrets read from files (Kubernetes Secret mounts)."""

from __future__ import annotations

import logging
import ssl
import stat
from pathlib import Path

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from relay.errors import RetryableSinkError

log = logging.getLogger("relay.settings")


def read_secret_file(path: Path, setting: str) -> SecretStr:
    """A secret from a file (Kubernetes Secret mounts), without its trailing newline. An empty
    file is an error (a secret mounted before it was filled in); a file anyone on the machine
    can read is accepted with a warning."""
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except OSError as exc:
        raise ValueError(f"{setting}: cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{setting}: {path} is not UTF-8 text") from exc
    secret = text.rstrip("\r\n")
    if not secret:
        raise ValueError(f"{setting}: {path} is empty")
    if mode & stat.S_IROTH:
        log.warning(
            "%s: %s is readable by every user of this machine (mode %s); make it 0400 or "
            "0440 (Kubernetes: defaultMode)",
            setting,
            path,
            oct(stat.S_IMODE(mode)),
        )
    return SecretStr(secret)


def resolve_secret_files(model: BaseModel, *pairs: tuple[str, str]) -> None:
    """For each `(secret, secret_file)` pair of fields, read the file into the secret (for a
    model validator). Setting both is a config error; the file field is cleared once read, so
    the model holds one source of the secret."""
    for name, file_name in pairs:
        path: Path | None = getattr(model, file_name)
        if path is None:
            continue
        if getattr(model, name) is not None:
            raise ValueError(f"{name} and {file_name}: set only one")
        setattr(model, name, read_secret_file(path, file_name))
        setattr(model, file_name, None)


class TlsSettings(BaseModel):
    """TLS of a sink's connection: whom to trust, and a client certificate for mTLS. Present
    (even empty: `tls: {}`, the system CAs) means the sink connects with TLS."""

    model_config = ConfigDict(extra="forbid")

    ca_file: Path | None = Field(
        default=None, description="PEM bundle of CAs to trust; default: the system store."
    )
    cert_file: Path | None = Field(default=None, description="Client certificate (PEM), for mTLS.")
    key_file: Path | None = Field(
        default=None, description="Client private key (PEM); default: in cert_file."
    )
    key_password: SecretStr | None = Field(
        default=None, description="Passphrase of an encrypted key_file."
    )
    key_password_file: Path | None = Field(
        default=None, description="File holding key_password (a mounted secret)."
    )
    verify: bool = Field(
        default=True,
        description="Verify the server's certificate and host name. Off only for tests.",
    )

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _exists(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"{info.field_name}: no such file: {path}")
        return path

    @model_validator(mode="after")
    def _check(self) -> TlsSettings:
        resolve_secret_files(self, ("key_password", "key_password_file"))
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file: set cert_file too")
        # Built once now, so a malformed PEM or a wrong passphrase is a config error, not a
        # retry loop.
        self.ssl_context()
        return self

    def ssl_context(self) -> ssl.SSLContext:
        """A client context; ValueError naming the setting when a file does not load."""
        try:
            ctx = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH,
                cafile=str(self.ca_file) if self.ca_file is not None else None,
            )
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"ca_file: cannot load {self.ca_file}: {exc}") from exc
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert_file is not None:
            # Never None: OpenSSL would prompt on the terminal for an encrypted key.
            password = self.key_password.get_secret_value() if self.key_password else ""
            try:
                ctx.load_cert_chain(
                    str(self.cert_file),
                    str(self.key_file) if self.key_file is not None else None,
                    password=password,
                )
            except (OSError, ssl.SSLError) as exc:
                key = f" with key {self.key_file}" if self.key_file is not None else ""
                raise ValueError(
                    f"cert_file/key_file: cannot load {self.cert_file}{key}: {exc}"
                    f"{self._passphrase_hint()}"
                ) from exc
        return ctx

    def _passphrase_hint(self) -> str:
        # OpenSSL says only "PEM lib" for a missing or wrong passphrase.
        key = self.key_file or self.cert_file
        try:
            encrypted = key is not None and "ENCRYPTED" in key.read_text(errors="replace")
        except OSError:
            return ""
        if not encrypted:
            return ""
        if self.key_password is None:
            return " (the key is encrypted: set key_password or key_password_file)"
        return " (the key is encrypted: is key_password right?)"

    def sink_ssl_context(self, sink: str) -> ssl.SSLContext:
        """The context at connect time: a file that broke since the config was checked is a
        retryable failure (it can be fixed without losing the events)."""
        try:
            return self.ssl_context()
        except ValueError as exc:
            raise RetryableSinkError(f"tls: {exc}", sink=sink) from exc
