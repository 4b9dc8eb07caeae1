"""What `make fetch` downloads: patients of an Imaging Data Commons collection, each one CT series and
the RTSTRUCT drawn on it, with sizes, instance counts and licences from the IDC index.

Owns the query and the choice, not the download (data_prep/fetch.py):

* `load_series(index, cohort)` reads the CT and RTSTRUCT series of one collection from the index
  (idc-index-data's parquet, queried with duckdb as idc-index does; a .csv with the same columns is
  read too). `cohort` is a collection_id in any case, with '-' or '_' ("nsclc-radiomics").
* `pair(series)` gives each patient its (CT, RTSTRUCT) pair: the first RTSTRUCT (by study date, then
  UID) whose study holds exactly one CT series. The index holds no reference from an RTSTRUCT to its
  image series, so the pairing is by study; the download then checks it against the RTSTRUCT's own
  ReferencedFrameOfReferenceSequence (data_prep/fetch.py). Patients without such a pair are listed
  with the reason.
* `select(pairs, n, seed, patients)`: all, the first N in PatientID order, a seeded sample of N, or a
  list of PatientIDs.
* `licence_text(plan)`: the licences and citations the index gives (license_short_name, source_DOI),
  plus IDC's own publication, which idc-index adds to every citation list.
"""
import random
import re

# The columns the plan needs; all are in idc-index-data's idc_index table.
COLUMNS = ("collection_id", "PatientID", "StudyInstanceUID", "StudyDate", "SeriesInstanceUID", "Modality",
           "instanceCount", "series_size_MB", "aws_bucket", "crdc_series_uuid", "license_short_name",
           "source_DOI")
IDC_DOI = "10.1148/rg.230180"      # Fedorov et al., RadioGraphics 2023: the IDC publication idc-index cites
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


class PlanError(ValueError):
    pass


def collection_id(cohort):
    return cohort.strip().lower().replace("-", "_")


def _source(index):
    quoted = "'%s'" % str(index).replace("'", "''")
    return ("read_csv_auto(%s, all_varchar=true)" if str(index).endswith(".csv") else "read_parquet(%s)") % quoted


def load_series(con, index, cohort):
    """[{column: value}] of the CT and RTSTRUCT series of `cohort` in `index` (duckdb connection `con`)."""
    cid = collection_id(cohort)
    src = _source(index)
    rows = con.execute("SELECT %s FROM %s WHERE lower(collection_id) = ? AND Modality IN ('CT', 'RTSTRUCT')"
                       % (", ".join(COLUMNS), src), [cid]).fetchall()
    if not rows:
        known = sorted(r[0] for r in con.execute("SELECT DISTINCT lower(collection_id) FROM %s" % src).fetchall())
        if cid in known:
            raise PlanError("collection %s has no CT or RTSTRUCT series in the index" % cid)
        close = [k for k in known if cid.split("_")[0] in k][:8]
        raise PlanError("no collection %r in the IDC index%s" % (cid, " (similar: %s)" % ", ".join(close) if close else ""))
    out = []
    for r in rows:
        s = dict(zip(COLUMNS, r))
        s["instanceCount"] = int(s["instanceCount"])
        s["series_size_MB"] = float(s["series_size_MB"])
        out.append(s)
    return out


def _series_entry(s):
    return {"SeriesInstanceUID": s["SeriesInstanceUID"], "instances": s["instanceCount"],
            "MB": round(s["series_size_MB"], 2), "bucket": s["aws_bucket"], "crdc_series_uuid": s["crdc_series_uuid"],
            "licence": s["license_short_name"], "source_DOI": s["source_DOI"]}


def folder_name(patient_id):
    """A folder name for a PatientID: safe characters only, never hidden."""
    name = SAFE_NAME.sub("_", patient_id)
    return "_" + name if name.startswith(".") or not name else name


def pair(series):
    """({PatientID: plan entry}, [{PatientID, reason}]) for every patient with an RTSTRUCT or a CT."""
    by_patient = {}
    for s in series:
        by_patient.setdefault(s["PatientID"], []).append(s)
    pairs, skipped = {}, []
    for pid in sorted(by_patient):
        rows = by_patient[pid]
        rts = sorted((s for s in rows if s["Modality"] == "RTSTRUCT"),
                     key=lambda s: (s["StudyDate"] or "", s["SeriesInstanceUID"]))
        reason = "no RTSTRUCT series in the index"
        for rt in rts:
            cts = [s for s in rows if s["Modality"] == "CT" and s["StudyInstanceUID"] == rt["StudyInstanceUID"]]
            if len(cts) == 1:
                ct = cts[0]
                pairs[pid] = {"PatientID": pid, "folder": folder_name(pid), "StudyInstanceUID": rt["StudyInstanceUID"],
                              "CT": _series_entry(ct), "RTSTRUCT": _series_entry(rt),
                              "MB": round(ct["series_size_MB"] + rt["series_size_MB"], 2)}
                break
            reason = ("no CT series in the RTSTRUCT's study" if not cts else
                      "%d CT series in the RTSTRUCT's study (the index does not say which one it references)"
                      % len(cts))
        else:
            skipped.append({"PatientID": pid, "reason": reason})
    folders = {}
    for pid, e in pairs.items():
        if e["folder"] in folders:
            raise PlanError("PatientIDs %r and %r map to the same folder name %r"
                            % (folders[e["folder"]], pid, e["folder"]))
        folders[e["folder"]] = pid
    return pairs, skipped


def select(pairs, n=None, seed=None, patients=None):
    """The chosen entries, in PatientID order, and a description of the choice."""
    ids = sorted(pairs)
    if patients:
        unknown = [p for p in patients if p not in pairs]
        if unknown:
            raise PlanError("not in the plannable patients of this collection: %s" % ", ".join(unknown))
        chosen, how = sorted(set(patients)), {"mode": "list", "patients": len(set(patients))}
    elif n is None:
        chosen, how = ids, {"mode": "all"}
    else:
        if not 1 <= n <= len(ids):
            raise PlanError("N=%d, but the collection has %d plannable patients" % (n, len(ids)))
        if seed is None:
            chosen, how = ids[:n], {"mode": "first", "n": n, "order": "PatientID"}
        else:
            chosen, how = sorted(random.Random(seed).sample(ids, n)), {"mode": "sample", "n": n, "seed": seed}
    return [pairs[p] for p in chosen], how


def licences(entries):
    """{licence short name: [modalities]} over the planned series."""
    out = {}
    for e in entries:
        for mod in ("CT", "RTSTRUCT"):
            mods = out.setdefault(e[mod]["licence"], [])
            if mod not in mods:
                mods.append(mod)
    return out


def licence_url(short):
    """The Creative Commons deed of a short name such as 'CC BY-NC 3.0', or None."""
    m = re.match(r"^CC (BY(?:-NC)?(?:-SA|-ND)?) (\d\.\d)$", short or "")
    return "https://creativecommons.org/licenses/%s/%s/" % (m.group(1).lower(), m.group(2)) if m else None


def dois(entries):
    out = []
    for e in entries:
        for mod in ("CT", "RTSTRUCT"):
            d = e[mod]["source_DOI"]
            if d and d not in out:
                out.append(d)
    return out


def licence_text(plan):
    """The text written beside the data (LICENSE_AND_CITATION.txt) and printed."""
    lines = ["%s: %d patients from the NCI Imaging Data Commons (collection %s, %s)."
             % (plan["cohort"], len(plan["patients"]), plan["collection_id"], plan["index"]),
             "", "Licences (license_short_name in the index, per series):"]
    for short, mods in plan["licences"].items():
        url = licence_url(short)
        lines.append("  %s: %s%s" % (short, ", ".join(mods), " -- " + url if url else ""))
    lines += ["", "Cite (source_DOI in the index, and the Imaging Data Commons itself):"]
    lines += ["  https://doi.org/%s" % d for d in plan["citations"]]
    lines += ["", "Formatted references: https://citation.crosscite.org/ from these DOIs, or idc-index's",
              "IDCClient.citations_from_selection() (both online).", ""]
    return "\n".join(lines)


def make_plan(series, cohort, index_label, n=None, seed=None, patients=None):
    pairs, skipped = pair(series)
    if not pairs:
        raise PlanError("no patient of %s has a CT series and an RTSTRUCT in one study" % collection_id(cohort))
    entries, how = select(pairs, n, seed, patients)
    return {"cohort": cohort, "collection_id": collection_id(cohort), "index": index_label, "selection": how,
            "patients": entries, "MB": round(sum(e["MB"] for e in entries), 2),
            "licences": licences(entries), "citations": dois(entries) + [IDC_DOI],
            "not_plannable": skipped}
