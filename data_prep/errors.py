"""BadInput: the one exception every reader raises for input it cannot use.

Its text is a single line that names the patient by pseudonym and the offending file by its path
relative to the patient folder ("." for the folder itself), e.g.

    patient P003, file CT/IM0042.dcm: truncated pixel data (262144 of 524288 bytes)

Messages never carry PatientName, PatientID or the input folder's name; the tools print them as is.
The readers make sure of it with BadInput.redacted: every identifying string they know of (the
DICOM identity attributes of the files read, the input path and its folder name) is replaced by
"<patient>" in the file path and the message, wherever it appears as a whole word (an ROI named
after the PatientID, a sub-folder named after the patient, a path inside a library's error text).
"""
import re

REDACTED = "<patient>"
MIN_SECRET = 3      # shorter strings ("CT", "1") would clobber ordinary words and numbers


def redact(text, secrets, ignore_case=True, by=REDACTED):
    """`text` with each of `secrets` replaced by `by` where it is not part of a longer word."""
    text = str(text)
    for secret in sorted({str(s).strip() for s in secrets if s is not None} - {""}, key=len, reverse=True):
        if len(secret) < MIN_SECRET:
            continue
        pattern = re.escape(secret)
        if secret[0].isalnum():
            pattern = r"(?<![0-9A-Za-z])" + pattern
        if secret[-1].isalnum():
            pattern += r"(?![0-9A-Za-z])"
        text = re.sub(pattern, lambda m: by, text, flags=re.IGNORECASE if ignore_case else 0)
    return text


class BadInput(Exception):
    """Input that the toolkit refuses, with the patient pseudonym, file and reason kept apart."""

    def __init__(self, patient, file, message):
        self.patient = str(patient)
        self.file = str(file) if file not in (None, "") else "."
        self.message = " ".join(str(message).split())   # always one line
        super().__init__(self.patient, self.file, self.message)

    def redacted(self, secrets, ignore_case=True):
        """A copy with `secrets` removed from the file path and the message (see redact)."""
        return BadInput(self.patient, redact(self.file, secrets, ignore_case),
                        redact(self.message, secrets, ignore_case))

    def __str__(self):
        return "patient %s, file %s: %s" % (self.patient, self.file, self.message)
