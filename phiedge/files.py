"""Files whose bytes are a function of their content only. Device-path module: numpy, zipfile."""
from __future__ import annotations

import io
import os
import time
import zipfile
from pathlib import Path

import numpy as np

ZIP_EPOCH = 315532800          # 1980-01-01, the earliest time a zip member can carry


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez with fixed member times (SOURCE_DATE_EPOCH, else 1980-01-01): np.savez stamps every member with
    the current time, so two builds of the same bundle differed."""
    stamp = time.gmtime(max(int(os.environ.get("SOURCE_DATE_EPOCH", ZIP_EPOCH)), ZIP_EPOCH))[:6]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for name, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(value), allow_pickle=False)
            z.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=stamp), buf.getvalue())
