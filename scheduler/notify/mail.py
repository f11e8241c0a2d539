"""One mail through the configured SMTP server ([notify] smtp_*).

Every header is built by gpulab from checked values: the recipient passed `check_mail` (one
plain address, no control characters) at submit and is checked again here, and job-written
text goes only into the body, escaped. `email.policy.SMTP` refuses a header value with a line
break, so nothing a user typed can add a header or a recipient.
"""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import formatdate, make_msgid
from pathlib import Path

from jobs.config import NotifyConfig
from jobs.notify import check_mail
from jobs.text import safe


class MailFailed(RuntimeError):
    def __init__(self, message: str, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


def build(config: NotifyConfig, to: str, subject: str, text: str, delivery_id: str) -> EmailMessage:
    message = EmailMessage(policy=SMTP_POLICY)
    message["From"] = config.smtp_from
    message["To"] = check_mail(to)
    message["Subject"] = safe(subject, 200)
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid("gpulab")
    message["X-Gpulab-Delivery"] = delivery_id  # for dedupe by a mail filter
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to this
    message.set_content(text)
    return message


def send(config: NotifyConfig, message: EmailMessage) -> None:
    """Hand one message to the SMTP server; MailFailed says whether trying again may help."""
    try:
        with smtplib.SMTP(config.smtp_host, config.smtp_port, timeout=config.smtp_timeout_s) as smtp:
            if config.smtp_starttls:
                smtp.starttls(context=ssl.create_default_context())
            if config.smtp_user:
                smtp.login(config.smtp_user, _password(config))
            smtp.send_message(message)
    except smtplib.SMTPRecipientsRefused as exc:
        raise MailFailed(f"recipient refused: {safe(str(exc), 200)}", retry=False) from None
    except smtplib.SMTPResponseException as exc:
        raise MailFailed(
            f"SMTP {exc.smtp_code}: {safe(str(exc.smtp_error), 200)}",
            retry=exc.smtp_code >= 400 and exc.smtp_code < 500,
        ) from None
    except (OSError, smtplib.SMTPException) as exc:
        raise MailFailed(f"{type(exc).__name__}: {safe(str(exc), 200)}", retry=True) from None


def _password(config: NotifyConfig) -> str:
    try:
        return Path(config.smtp_password_file).read_text().strip()
    except OSError as exc:
        raise MailFailed(f"[notify] smtp_password_file: {exc.strerror}", retry=True) from None
