"""Where numba caches the compiled kernels: a user cache folder, never the installed package.

numba's ``cache=True`` stores machine code beside the source file, in the
package's ``__pycache__``, whenever it may write there. For an installed
package that is wrong twice over:

* pip does not know these files, so neither an uninstall nor a reinstall
  removes them. After ``pip install .`` and a run, ``pip install -e .`` left
  ``site-packages/rollmed_dask/__pycache__`` behind, which Python then
  imported as an empty namespace package that hid the editable install.
* a read-only installation (a shared environment on a cluster) cannot hold
  them, and every user wants the cache all the same.

So the kernels of this package are cached in the first folder of these that
can be written:

1. ``$ROLLMED_DASK_CACHE_DIR``
2. ``$XDG_CACHE_HOME/rollmed-dask/numba``
3. ``~/.cache/rollmed-dask/numba``
4. ``rollmed-dask-numba-UID`` in the temporary folder (``$TMPDIR``), if it
   belongs to this user; else a new private temporary folder for this process.

Inside it, each installation of the package has a subfolder of its own
(``rollmed_dask_`` and a hash of its path, :func:`installation_dir`), holding
numba's ``.nbi`` index and ``.nbc`` code files, and a ``ready-...`` file once
the first job has compiled the kernels of every common dtype
(:func:`rollmed_dask.kernels_numba.prepare`). Deleting the folder is always
safe: the kernels compile again on their next use. A read-only installation
caches like any other, in the user's folder; only if no folder above can be
written does each process compile what it uses (and no more) into a folder of
its own. ``NUMBA_CACHE_DIR`` does not apply to these kernels;
other numba code keeps numba's own rules.

:func:`install` puts the locator in front of numba's own; ``kernels_numba``
calls it before it defines its kernels, since numba picks a function's cache
folder when the function is decorated.

>>> from rollmed_dask import numba_cache
>>> numba_cache.cache_dir() == numba_cache.cache_dir()  # chosen once per process
True
"""

from __future__ import annotations

import functools
import os
import stat
import tempfile

from numba.core import caching

# numba renamed it from _CacheImpl (0.59) to CacheImpl
_CACHE_IMPL = getattr(caching, "CacheImpl", None) or caching._CacheImpl

#: Cache folders made for this process alone: the next one will not find them.
_THROWAWAY: set = set()

#: The folder of this package: only functions defined in its files are cached here.
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _usable(path: str) -> bool:
    """Whether ``path`` exists or can be made, and a file can be written in it."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def _private_temp_dir() -> str:
    """A folder under the temporary folder that only this user can have made.

    The cache holds pickled code that numba loads, so a folder that another
    user made (in a shared ``/tmp``) is never used.
    """
    uid = getattr(os, "getuid", lambda: 0)()
    path = os.path.join(tempfile.gettempdir(), f"rollmed-dask-numba-{uid}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if stat.S_ISDIR(info.st_mode) and info.st_uid == uid and _usable(path):
        return path
    path = tempfile.mkdtemp(prefix="rollmed-dask-numba-")
    _THROWAWAY.add(path)
    return path


@functools.cache
def cache_dir() -> str:
    """The folder that holds the compiled kernels of this package (see the module docstring).

    >>> import os
    >>> os.path.isabs(cache_dir())
    True
    """
    env = os.environ
    candidates = []
    if env.get("ROLLMED_DASK_CACHE_DIR"):
        candidates.append(env["ROLLMED_DASK_CACHE_DIR"])
    xdg = env.get("XDG_CACHE_HOME")
    if not (xdg and os.path.isabs(xdg)):  # the XDG spec ignores relative paths
        xdg = os.path.join(os.path.expanduser("~"), ".cache")
    candidates.append(os.path.join(xdg, "rollmed-dask", "numba"))
    for path in candidates:
        if _usable(path):
            return os.path.abspath(path)
    return _private_temp_dir()


def is_kept() -> bool:
    """Whether :func:`cache_dir` is found again by the next process (not made for this one).

    >>> is_kept()
    True
    """
    return cache_dir() not in _THROWAWAY


def installation_dir(py_file: str) -> str:
    """The subfolder of :func:`cache_dir` that holds the kernels defined in ``py_file``.

    One per installation of the package (numba names it after a hash of the
    package's folder).

    >>> installation_dir(__file__).startswith(cache_dir())
    True
    """
    subfolder = caching._CacheLocator.get_suitable_cache_subpath(py_file)
    return os.path.join(cache_dir(), subfolder)


class PackageCacheLocator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
    """numba cache locator for the functions of this package: they go to :func:`cache_dir`."""

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = installation_dir(py_file)

    def get_cache_path(self):
        return self._cache_path

    @classmethod
    def from_function(cls, py_func, py_file):
        if os.path.dirname(os.path.abspath(py_file)) != PACKAGE_DIR:
            return None  # not ours: numba's own locators decide
        return super().from_function(py_func, py_file)


def install() -> None:
    """Put :class:`PackageCacheLocator` first in numba's list of locators (once).

    >>> install()
    >>> _CACHE_IMPL._locator_classes[0] is PackageCacheLocator
    True
    """
    locators = _CACHE_IMPL._locator_classes
    if PackageCacheLocator not in locators:
        locators.insert(0, PackageCacheLocator)
