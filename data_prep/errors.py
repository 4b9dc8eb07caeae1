"""BadInput: the one exception every reader raises for input it cannot use.

Its text is a single line that names the patient by pseudonym and the offending file by its path
relative to the patient folder ("." for the folder itself), e.g.

    patient P003, file CT/IM0042.dcm: truncated pixel data (262144 of 524288 bytes)

Messages never carry PatientName, PatientID or the input folder's name; the tools print them as is.
"""


class BadInput(Exception):
    """Input that the toolkit refuses, with the patient pseudonym, file and reason kept apart."""

    def __init__(self, patient, file, message):
        self.patient = str(patient)
        self.file = str(file) if file not in (None, "") else "."
        self.message = " ".join(str(message).split())   # always one line
        super().__init__(self.patient, self.file, self.message)

    def __str__(self):
        return "patient %s, file %s: %s" % (self.patient, self.file, self.message)
