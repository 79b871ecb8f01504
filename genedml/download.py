"""Fetch the her2st cohort from its public GitHub repository into the layout cohorts.py reads.

    python data.py download her2st --root data/her2st [--base-url URL] [--only counts,spots,images] [--sections A1,B4]

File <path> is fetched from <base-url>data/<path> and lands at <root>/<path>, so the folders
(ST-cnts/, ST-spotfiles/, ST-imgs/<patient>/<section>/) are upstream's own. Each file is downloaded
into <file>.part and renamed into place only once its size is verified (against the size recorded
below where known, and against the server's Content-Length / Content-Range always), so a final file
is always complete. A rerun skips complete files and resumes a .part file with an HTTP Range request.
cSCC (GEO GSE144240) and STNet (Mendeley Data 29ntw7sh4r) need a manual download; the demo cohort is
synthetic (demo.make_demo_cohort) and is never downloaded.

Data: Andersson et al., Nature Communications 12, 6012 (2021), doi:10.1038/s41467-021-26271-2.
"""
import argparse
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

HER2ST_URL = "https://raw.githubusercontent.com/almaan/her2st/master/"
KINDS = ("counts", "spots", "images")
RETRIES = 2            # extra attempts after a dropped connection or a 5xx answer
RETRY_WAIT = 2.0       # seconds before the first retry, doubled each time
CHUNK = 1 << 16
LFS_MAGIC = b"version https://git-lfs"

# The 36 her2st sections (upstream commit 85df741): section -> (bytes of ST-cnts/<s>.tsv.gz,
# bytes of ST-spotfiles/<s>_selection.tsv, image file name in ST-imgs/<patient>/<s>/, its bytes).
# None = size not recorded (images of 4 MiB and more); those are checked against Content-Length only.
HER2ST = {
    "A1": (1033376, 12879, "9769_C1_HE_small.jpg", None),
    "A2": (1340590, 11958, "9769_C2_HE_small.jpg", None),
    "A3": (1358980, 13441, "9769_D1_HE_small.jpg", None),
    "A4": (1297246, 12712, "9769_D2_HE_small.jpg", None),
    "A5": (1247949, 12398, "9769_E1_HE_small.jpg", None),
    "A6": (1314417, 11860, "9769_E2_HE_small.jpg", None),
    "B1": (657516, 10794, "BT10737_C1_HE.jpg", None),
    "B2": (596436, 9838, "BT10737_C2_HE.jpg", None),
    "B3": (613993, 10924, "BT10737_D1_HE.jpg", None),
    "B4": (563881, 10560, "BT10737_D2_HE.jpg", 4076552),
    "B5": (688429, 10631, "BT10737_E1_HE.jpg", None),
    "B6": (625356, 10247, "BT10737_E2_HE.jpg", None),
    "C1": (752999, 6631, "5714_HE_BT_C1.jpg", None),
    "C2": (821408, 7053, "5714_HE_BT_C2.jpg", 3990230),
    "C3": (847901, 6728, "5714_HE_BT_D1.jpg", 3915842),
    "C4": (886246, 6960, "5714_HE_BT_D2.jpg", 3806070),
    "C5": (845308, 6802, "5714_HE_BT_E1.jpg", 3719130),
    "C6": (892853, 6655, "5714_HE_BT_E2.jpg", 3941039),
    "D1": (1251370, 11444, "10426_HE_BT_C1.jpg", None),
    "D2": (990376, 11223, "10426_HE_BT_C2.jpg", None),
    "D3": (1061872, 11120, "10426_HE_BT_D1.jpg", None),
    "D4": (1023224, 11260, "10426_HE_BT_D2.jpg", None),
    "D5": (1073620, 11517, "10426_HE_BT_E1.jpg", None),
    "D6": (1011895, 11921, "10426_HE_BT_E2.jpg", None),
    "E1": (1017499, 21672, "HE_BT23567_D2.jpg", None),
    "E2": (1256268, 21116, "HE_BT23567_E1.jpg", None),
    "E3": (1237843, 21146, "HE_BT23567_E2.jpg", None),
    "F1": (1778749, 25344, "HE_BT23810_D2.jpg", None),
    "F2": (1880241, 25504, "HE_BT23810_E1.jpg", None),
    "F3": (1900113, 26018, "HE_BT23810_E2.jpg", None),
    "G1": (852454, 16203, "HE_BT23903_C1a.jpg", None),
    "G2": (954118, 17128, "HE_BT23903_C2a.jpg", None),
    "G3": (837354, 17139, "HE_BT23903_D1a.jpg", None),
    "H1": (972770, 22695, "HE_BT24044_D2.jpg", None),
    "H2": (1023577, 22331, "HE_BT24044_E1.jpg", None),
    "H3": (733852, 18964, "HE_BT24044_E2.jpg", None),
}

MANUAL = {
    "cscc": "cSCC (Ji et al., Cell 2020) is on GEO and cannot be fetched by this script.\n"
            "  1. Download GSE144240_RAW.tar from https://www.ncbi.nlm.nih.gov/geo/query/acc.cgi?acc=GSE144240\n"
            "  2. Unpack it into {root}/ (per section: *_stdata.tsv.gz counts, *spot_data-selection*.tsv, *.jpg H&E)\n"
            "  cohorts.py's module docstring gives the exact layout; check_cohort lists whatever is missing.",
    "stnet": "STNet (He et al., Nature Biomedical Engineering 2020) is on Mendeley Data and cannot be fetched by this script.\n"
             "  1. Download the dataset from https://data.mendeley.com/datasets/29ntw7sh4r\n"
             "  2. Unpack it into {root}/ (per section: counts .tsv.gz, spot coordinates, H&E image)\n"
             "  cohorts.py's module docstring gives the exact layout; check_cohort lists whatever is missing.",
}


class DownloadError(Exception):
    """A file that cannot be fetched as it is (bad size, HTTP 4xx, Git LFS pointer): retrying won't help."""


def her2st_files(sections=None, only=KINDS) -> list[tuple[str, int | None]]:
    """(path under data/, size in bytes or None) of every file a loader needs, in table order."""
    sections = list(HER2ST) if sections is None else list(sections)
    unknown = sorted(set(sections) - set(HER2ST)) + sorted(set(only) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown her2st section(s) or kind(s) {unknown}; sections are "
                         f"{','.join(HER2ST)}, kinds {','.join(KINDS)}")
    files = []
    for s in sections:
        n_counts, n_spots, image, n_image = HER2ST[s]
        paths = {"counts": (f"ST-cnts/{s}.tsv.gz", n_counts),
                 "spots": (f"ST-spotfiles/{s}_selection.tsv", n_spots),
                 "images": (f"ST-imgs/{s[0]}/{s}/{image}", n_image)}   # patient folder = first letter
        files += [paths[k] for k in KINDS if k in only]
    return files


def _fetch_once(url: str, dest: Path, size: int | None, progress: bool) -> None:
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:       # a stale .part longer than the file: start over
        part.unlink()
        have = 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have == size:          # "range not satisfiable": the .part was already whole
            os.replace(part, dest)
            return
        if e.code == 416:                           # a .part the server cannot continue: start over
            part.unlink()
            raise ConnectionError(f"{dest.name}: server refused to resume at byte {have}") from None
        if e.code < 500:
            raise DownloadError(f"{dest.name}: HTTP {e.code} {e.reason} for {url}") from None
        raise
    with response:
        if response.status == 206:                 # resumed: "Content-Range: bytes <start>-<end>/<total>"
            m = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", response.headers.get("Content-Range", ""))
            if not m or int(m[1]) != have:
                part.unlink()
                raise DownloadError(f"{dest.name}: asked for bytes {have}- and got Content-Range "
                                    f"{response.headers.get('Content-Range')!r}; the .part was removed")
            total, mode = int(m[2]), "ab"
        else:                                       # 200: the whole file, from byte 0
            length = response.headers.get("Content-Length")
            total, mode, have = (int(length) if length else None), "wb", 0
        head = response.read(CHUNK)
        if mode == "wb" and head.startswith(LFS_MAGIC):
            raise DownloadError(f"{dest.name}: {url} returned a Git LFS pointer, not the file; "
                                f"point --base-url at a mirror that serves the real files")
        if size is not None and total is not None and total != size:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{dest.name}: server says {total} bytes, expected {size}")
        expected = total if total is not None else size
        with open(part, mode) as f, tqdm(total=expected, initial=have, unit="B", unit_scale=True,
                                         desc=dest.name, leave=False, disable=not progress) as bar:
            while head:
                f.write(head)
                bar.update(len(head))
                head = response.read(CHUNK)
    got = part.stat().st_size
    if expected is not None and got < expected:    # connection dropped: keep the .part and retry
        raise ConnectionError(f"{dest.name}: got {got} of {expected} bytes")
    if expected is not None and got != expected:
        part.unlink()
        raise DownloadError(f"{dest.name}: got {got} bytes, expected {expected}")
    os.replace(part, dest)                         # atomic: the final name appears only when complete


def fetch(url: str, dest, size: int | None = None, progress: bool = True) -> None:
    """Download url to dest, resuming dest.part; retry dropped connections and 5xx answers."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(RETRIES + 1):
        try:
            return _fetch_once(url, dest, size, progress)
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
            if attempt == RETRIES:
                raise DownloadError(f"{dest.name}: {e} (after {RETRIES + 1} attempts; rerun to resume)") from None
            time.sleep(RETRY_WAIT * 2 ** attempt)


def check_base_url(url: str) -> None:
    """Refuse, naming it, a --base-url that urllib cannot fetch from (its own ValueError names no URL
    of ours, and a URL without a host would be retried as if the network had dropped)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # "Invalid IPv6 URL": an unclosed [
        parts = None
    if parts is None or parts.scheme not in ("http", "https", "file") or (parts.scheme != "file" and not parts.hostname):
        raise ValueError(f"--base-url {url!r}: not a URL to fetch from; expected http(s)://host/... "
                         f"(the repository root holding data/) or file:///folder")


def download_cohort(cohort: str, root, base_url=None, sections=None, progress=True,
                    only=KINDS, files=None) -> list[Path]:
    """Fetch a cohort's files into root; return their paths. `files` = [(path under data/, size or None)]
    replaces the built-in her2st table (tests use it). Prints a summary; raises DownloadError naming
    every file that failed, after trying all of them."""
    if cohort in MANUAL:
        raise ValueError(MANUAL[cohort].format(root=root))
    if cohort == "demo":
        raise ValueError("the demo cohort is synthetic: demo.make_demo_cohort(root) writes it, nothing to download")
    if cohort != "her2st":
        raise ValueError(f"unknown cohort {cohort!r}; expected her2st, cscc, stnet or demo")
    root, base = Path(root), (base_url or HER2ST_URL).rstrip("/") + "/data/"
    check_base_url(base_url or HER2ST_URL)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root}: a file, not a folder; --root names the folder the cohort is written into")
    files = her2st_files(sections, only) if files is None else files
    done, present, failed = [], [], []
    for i, (path, size) in enumerate(files):
        dest = root / path
        if dest.is_file() and (size is None or dest.stat().st_size == size):
            present.append(dest)                   # final names are only ever complete files
            continue
        if progress:
            print(f"[{i + 1}/{len(files)}] {path}", file=sys.stderr)
        try:
            fetch(base + path, dest, size, progress)
            done.append(dest)
        except DownloadError as e:
            failed.append(str(e))
    print(f"{cohort} in {root}: {len(done)} downloaded, {len(present)} already present, {len(failed)} failed")
    if failed:
        raise DownloadError(f"{len(failed)} file(s) failed:\n  " + "\n  ".join(failed))
    return [root / path for path, _ in files]


def get_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python data.py download", description=__doc__.split("\n\n")[0],
        epilog="A rerun skips complete files and resumes partial ones. cscc and stnet print manual steps (exit 2).")
    p.add_argument("cohort", choices=["her2st", "cscc", "stnet", "demo"],
                   help="her2st is fetched; cscc and stnet print manual steps; demo is generated, not fetched")
    p.add_argument("--root", default=None, help="destination folder (default: data/<cohort>)")
    p.add_argument("--base-url", default=HER2ST_URL,
                   help="repository root holding data/...; change it to use a mirror (e.g. when raw GitHub "
                        "serves Git LFS pointers or is unreachable)")
    p.add_argument("--only", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    p.add_argument("--sections", default=None,
                   help="comma-separated sections, e.g. B4,C2 (default: all 36)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    args.only = args.only.split(",")
    args.sections = args.sections.split(",") if args.sections else None
    if bad := [k for k in args.only if k not in KINDS]:
        p.error(f"--only: unknown kind(s) {bad}; choose from {','.join(KINDS)}")
    if bad := [s for s in args.sections or [] if s not in HER2ST]:
        p.error(f"--sections: unknown section(s) {bad}; her2st has {','.join(HER2ST)}")
    return args


def main(argv=None) -> int:
    """0 = everything present, 1 = some file failed, 2 = this cohort needs a manual download, or a
    --root or --base-url that cannot be used."""
    args = get_args(argv)
    root = Path(args.root or f"data/{args.cohort}")
    if args.cohort in MANUAL:
        print(MANUAL[args.cohort].format(root=root))
        return 2
    if args.cohort == "demo":
        print("demo is generated, not downloaded: demo.make_demo_cohort(root) writes it on first use")
        return 0
    try:
        download_cohort(args.cohort, root, args.base_url, args.sections, not args.quiet, args.only)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # a --root or --base-url that cannot be used
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

