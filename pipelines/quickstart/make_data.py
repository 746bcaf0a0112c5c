"""Regenerates proteins.fasta: 400 synthetic protein sequences drawn with natural
amino-acid background frequencies (UniProtKB/Swiss-Prot), deterministic seed.
The quickstart ships the output; this script documents how it was made."""
import random

FREQ = {
    "A": 8.25, "R": 5.53, "Q": 3.93, "N": 4.06, "D": 5.45, "C": 1.37, "E": 6.75, "G": 7.07,
    "H": 2.27, "I": 5.96, "L": 9.66, "K": 5.84, "M": 2.42, "F": 3.86, "P": 4.70, "S": 6.56,
    "T": 5.34, "W": 1.08, "Y": 2.92, "V": 6.87,
}
rng = random.Random(20261122)
aas, weights = zip(*FREQ.items())
with open("proteins.fasta", "w") as f:
    for i in range(400):
        n = max(30, int(rng.lognormvariate(5.6, 0.5)))
        seq = "M" + "".join(rng.choices(aas, weights, k=n - 1))
        # A few records need cleaning: lower case, and one with a non-standard letter.
        if i % 97 == 5:
            seq = seq.lower()
        if i == 123:
            seq = seq[:10] + "Z" + seq[11:]
        f.write(f">nx{i:04d} synthetic protein {i}\n")
        for k in range(0, len(seq), 60):
            f.write(seq[k:k + 60] + "\n")
