"""Theoph.csv (R datasets, wide: one row per sample) -> theoph_long.csv + theoph_patients.csv.

Long CSV rows: one dose row per subject (time 0, amount Dose[mg/kg] * Wt[kg] in mg, as nlmixr2's
theo_sd) and one theophylline row per sample (mg/L). Registry: every subject with consent true.
Run from this directory: python make_theoph.py
"""
import csv

rows = list(csv.DictReader(open("Theoph.csv")))
subjects = []
with open("theoph_long.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["patient", "time", "variable", "value", "unit"])
    for r in rows:
        sid = f"theo-{int(r['Subject']):02d}"
        if sid not in subjects:
            subjects.append(sid)
            w.writerow([sid, "0", "dose", f"{float(r['Dose']) * float(r['Wt']):.6g}", "mg"])
        w.writerow([sid, r["Time"], "theophylline", r["conc"], "mg/L"])
with open("theoph_patients.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["id", "consent"])
    for s in sorted(subjects):
        w.writerow([s, "true"])
