"""The output's compression: its spellings, their levels, and the filters or codecs.

dcnum's spellings (``logic/job.py``, ``get_hdf5_dataset_kwargs``): ``zstd-1`` to
``zstd-9``, ``gzip-1`` to ``gzip-9`` and ``none``; plus what was accepted before
levels existed, with the same meaning: ``zstd`` is zstd level 5 (dcnum's
default) and ``gzip`` is gzip level 4. HDF5 gets hdf5plugin's Zstd filter or
HDF5's deflate, always with fletcher32 (h5chunks encodes both itself, at any
level); Zarr gets ``ZstdCodec``/``GzipCodec`` at the same level.

The default, zstd-1, was chosen by measurement (README, "Output format"): a
background changes in a few percent of its pixels from one frame to the next,
so the fast levels compress it as well as the slow ones, at a third of the
CPU time of zstd-5.
"""

from __future__ import annotations

__all__ = ["COMPRESSIONS", "DEFAULT_COMPRESSION", "check_compression", "hdf5_filter", "level"]

_LEVELS = range(1, 10)
#: Every spelling accepted, for ``--compression`` and ``compression=``.
COMPRESSIONS = (
    *(f"zstd-{n}" for n in _LEVELS),
    *(f"gzip-{n}" for n in _LEVELS),
    "zstd",
    "gzip",
    "none",
)
DEFAULT_COMPRESSION = "zstd-1"
# what the spellings without a level meant before levels could be chosen
_IMPLIED_LEVEL = {"zstd": 5, "gzip": 4}


def check_compression(compression) -> str:
    """Return ``compression`` if it is a known spelling, else one clear ValueError.

    Examples
    --------
    >>> check_compression("zstd-3")
    'zstd-3'
    >>> check_compression("zstd-0")
    Traceback (most recent call last):
    ...
    ValueError: compression='zstd-0' is not known; pass zstd-1 .. zstd-9, gzip-1 .. gzip-9, zstd (= zstd-5), gzip (= gzip-4) or none
    """  # noqa: E501
    if compression not in COMPRESSIONS:
        raise ValueError(
            f"compression={compression!r} is not known; pass zstd-1 .. zstd-9, "
            f"gzip-1 .. gzip-9, zstd (= zstd-5), gzip (= gzip-4) or none"
        )
    return compression


def level(compression: str) -> tuple[str, int | None]:
    """The codec and its level of a spelling.

    Examples
    --------
    >>> level("zstd"), level("gzip-9"), level("none")
    (('zstd', 5), ('gzip', 9), ('none', None))
    """
    check_compression(compression)
    if compression == "none":
        return "none", None
    name, _, n = compression.partition("-")
    return name, int(n) if n else _IMPLIED_LEVEL[name]


def hdf5_filter(compression: str):
    """The ``compression`` argument of :func:`rollmed_dask.rtdc.filter_kwargs`.

    Examples
    --------
    >>> hdf5_filter("gzip-6")
    {'compression': 'gzip', 'compression_opts': 6}
    >>> hdf5_filter("none")
    False
    """
    name, n = level(compression)
    if name == "none":
        return False
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": n}
    import hdf5plugin

    return dict(hdf5plugin.Zstd(clevel=n))


def zarr_compressors(compression: str):
    """Zarr's ``compressors`` argument for a spelling (None: uncompressed)."""
    from zarr.codecs import GzipCodec, ZstdCodec

    name, n = level(compression)
    if name == "none":
        return None
    if name == "gzip":
        return [GzipCodec(level=n)]
    # checksum=True: a damaged chunk fails loudly instead of returning wrong pixels
    return [ZstdCodec(level=n, checksum=True)]
