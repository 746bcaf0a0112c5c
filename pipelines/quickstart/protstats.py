"""Protein composition statistics for the Nexa quickstart (standard library only).

Subcommands, each reading inputs from NEXA_IN_* and writing under NEXA_OUT:
  clean        normalise a FASTA file and drop records with non-standard residues
  composition  amino-acid and dipeptide (2-mer) counts of one shard
  lengths      sequence length distribution
  merge        sum the shard counts into one table
  report       the final report (Markdown + JSON)
"""
import json
import os
import statistics
import sys
from collections import Counter

AMINO = "ACDEFGHIKLMNPQRSTVWY"
# Kyte-Doolittle hydropathy.
KD = {"A": 1.8, "R": -4.5, "N": -3.5, "D": -3.5, "C": 2.5, "Q": -3.5, "E": -3.5, "G": -0.4, "H": -3.2,
      "I": 4.5, "L": 3.8, "K": -3.9, "M": 1.9, "F": 2.8, "P": -1.6, "S": -0.8, "T": -0.7, "W": -0.9,
      "Y": -1.3, "V": 4.2}


def read_fasta(path):
    name, seq = None, []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            if line.startswith(">"):
                if name is not None:
                    yield name, "".join(seq)
                name, seq = line[1:], []
            else:
                seq.append(line)
    if name is not None:
        yield name, "".join(seq)


def out(name):
    return os.path.join(os.environ["NEXA_OUT"], name)


def dump(obj, name):
    with open(out(name), "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


def load(path):
    with open(path) as f:
        return json.load(f)


def clean():
    kept, dropped, lowered = 0, [], 0
    with open(out("proteins.fasta"), "w") as f:
        for name, seq in read_fasta(os.environ["NEXA_IN_FASTA"]):
            if seq != seq.upper():
                lowered += 1
            seq = seq.upper().rstrip("*")
            bad = sorted(set(seq) - set(AMINO))
            if bad:
                dropped.append({"id": name.split()[0], "non_standard": bad})
                continue
            kept += 1
            f.write(f">{name}\n")
            for k in range(0, len(seq), 60):
                f.write(seq[k:k + 60] + "\n")
    dump({"kept": kept, "dropped": dropped, "lowercase_fixed": lowered}, "qc.json")
    print(f"clean: kept {kept}, dropped {len(dropped)}, fixed case of {lowered}")


def composition():
    aa, di, n, residues = Counter(), Counter(), 0, 0
    for _, seq in read_fasta(os.environ["NEXA_IN_FASTA"]):
        n += 1
        residues += len(seq)
        aa.update(seq)
        di.update(seq[i:i + 2] for i in range(len(seq) - 1))
    dump({"sequences": n, "residues": residues, "amino_acids": dict(aa), "dipeptides": dict(di)}, "counts.json")
    print(f"composition shard {os.environ.get('NEXA_SHARD_INDEX')}: {n} sequences, {residues} residues")


def lengths():
    ls = sorted(len(seq) for _, seq in read_fasta(os.environ["NEXA_IN_FASTA"]))
    bins = Counter((l // 100) * 100 for l in ls)
    dump({
        "count": len(ls), "min": ls[0], "max": ls[-1], "mean": round(statistics.mean(ls), 2),
        "median": statistics.median(ls), "histogram_100": {str(k): v for k, v in sorted(bins.items())},
    }, "lengths.json")


def merge():
    root = os.environ["NEXA_IN_SHARDS"]
    manifest = load(os.path.join(root, "manifest.json"))
    aa, di, n, residues = Counter(), Counter(), 0, 0
    for shard in sorted(manifest["shards"], key=lambda s: s["index"]):
        c = load(os.path.join(root, f"shard-{shard['index']:05d}", "counts.json"))
        n += c["sequences"]
        residues += c["residues"]
        aa.update(c["amino_acids"])
        di.update(c["dipeptides"])
    dump({
        "sequences": n, "residues": residues, "shards": len(manifest["shards"]),
        "amino_acids": dict(aa), "dipeptides": dict(di), "lengths": load(os.environ["NEXA_IN_LENGTHS"]),
    }, "composition.json")


def report():
    c = load(os.environ["NEXA_IN_COMPOSITION"])
    qc = load(os.environ["NEXA_IN_QC"])
    total = c["residues"]
    freq = {a: c["amino_acids"].get(a, 0) / total for a in AMINO}
    gravy = sum(KD[a] * f for a, f in freq.items())
    top_di = sorted(c["dipeptides"].items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    L = c["lengths"]
    summary = {
        "sequences": c["sequences"], "residues": total, "shards": c["shards"],
        "dropped": len(qc["dropped"]), "gravy": round(gravy, 4),
        "frequencies": {a: round(f, 5) for a, f in freq.items()},
        "top_dipeptides": top_di, "length": {k: L[k] for k in ("min", "median", "mean", "max")},
    }
    dump(summary, "summary.json")
    lines = [
        "# Protein composition report", "",
        f"{c['sequences']} sequences, {total} residues, counted in {c['shards']} shards; "
        f"{len(qc['dropped'])} record(s) dropped for non-standard residues.", "",
        f"Lengths: min {L['min']}, median {L['median']}, mean {L['mean']}, max {L['max']}.", "",
        f"Grand average of hydropathy (GRAVY): {gravy:.4f}", "",
        "| residue | frequency |", "| --- | --- |",
    ]
    lines += [f"| {a} | {freq[a]:.4f} |" for a in sorted(AMINO, key=lambda a: -freq[a])]
    lines += ["", "Top dipeptides: " + ", ".join(f"{k} ({v})" for k, v in top_di), ""]
    with open(out("report.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines[:6]))


if __name__ == "__main__":
    {"clean": clean, "composition": composition, "lengths": lengths, "merge": merge, "report": report}[sys.argv[1]]()
