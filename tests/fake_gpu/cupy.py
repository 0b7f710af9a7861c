"""
A stand-in for CuPy that runs on the CPU, so the GPU path's discipline is tested without a GPU: with
tests/fake_gpu first on PYTHONPATH, `import cupy` finds this, and miniclip's set_device("gpu") runs
every compute line on these arrays. They behave as CuPy's do where it matters:

- no implicit conversion to NumPy: np.asarray(a), and anything that calls it, raises TypeError,
  as CuPy's ndarray does ("Implicit conversion to a NumPy array is not allowed");
- no mixing with NumPy arrays: an operation or a function call given both raises TypeError, as CuPy's
  kernels do ("Unsupported type <class 'numpy.ndarray'>"); Python and NumPy scalars are accepted;
- the explicit ways across work: cupy.asarray(numpy_array), a.get(), cupy.asnumpy(a), float(a) of
  one element, a.item(), a.tolist().

NumPy functions called on these arrays dispatch here (__array_ufunc__ and __array_function__), as
they do on CuPy's. Every result is computed by NumPy underneath, so the numbers equal the CPU path's.
"""
import types

import numpy

MIX = "Unsupported type <class 'numpy.ndarray'>: a NumPy array mixed with GPU arrays"


def unwrap(x):
    """Device arrays to their NumPy data, through lists, tuples and dicts; a NumPy array is an error."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, numpy.ndarray):
        raise TypeError(MIX)
    if isinstance(x, (list, tuple)):
        return type(x)(unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: unwrap(v) for k, v in x.items()}
    return x


def wrap(x):
    """NumPy results back to device arrays; a NumPy scalar (what a NumPy reduction returns) becomes a 0-d
    device array, as CuPy's reductions return; other values stay as they are."""
    if isinstance(x, numpy.ndarray):
        return ndarray(x)
    if isinstance(x, numpy.generic):
        return ndarray(numpy.asarray(x))
    if isinstance(x, tuple):
        return tuple(wrap(v) for v in x)
    if isinstance(x, list):
        return [wrap(v) for v in x]
    return x


def on_device(fn):
    """A NumPy function made to take and return device arrays only."""
    def call(*args, **kwargs):
        return wrap(fn(*unwrap(args), **unwrap(kwargs)))
    call.__name__ = getattr(fn, "__name__", "function")
    return call


class ndarray:
    __array_priority__ = 100
    __hash__ = None

    def __init__(self, a):
        self._a = a

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to "
                        "construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return wrap(getattr(ufunc, method)(*unwrap(inputs), **unwrap(kwargs)))

    def __array_function__(self, func, types, args, kwargs):
        return wrap(func(*unwrap(args), **unwrap(kwargs)))

    def get(self):
        return self._a.copy()

    def __getattr__(self, name):                # shape, dtype, reshape, sum, astype, T, ...
        if name.startswith("__"):               # __array_interface__ and the like: NumPy would read the data
            raise AttributeError(name)
        value = getattr(self._a, name)
        return on_device(value) if callable(value) else wrap(value)

    def __getitem__(self, key):
        return wrap(self._a[unwrap(key)])

    def __setitem__(self, key, value):
        self._a[unwrap(key)] = unwrap(value)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (wrap(v) for v in self._a)

    def __repr__(self):
        return f"fake_gpu.{self._a!r}"

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __bool__(self):
        return bool(self._a)

    def __complex__(self):
        return complex(self._a)


# Operators go through NumPy's ufuncs, so they refuse NumPy operands exactly as functions do.
for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
           "lshift", "rshift"):
    for form in (f"__{op}__", f"__r{op}__", f"__i{op}__"):
        def method(self, other, _name=form):
            result = getattr(self._a, _name)(unwrap(other))
            if result is NotImplemented:
                return NotImplemented
            if _name.startswith("__i"):         # in place: the same device array, updated
                return self
            return wrap(result)
        setattr(ndarray, form, method)
for op in ("eq", "ne", "lt", "le", "gt", "ge"):
    setattr(ndarray, f"__{op}__", lambda self, other, _name=f"__{op}__": wrap(getattr(self._a, _name)(unwrap(other))))
for op in ("neg", "pos", "abs", "invert"):
    setattr(ndarray, f"__{op}__", lambda self, _name=f"__{op}__": wrap(getattr(self._a, _name)()))


def asarray(a, dtype=None, order=None):
    """Host to device: the one place a NumPy array is accepted."""
    data = a._a if isinstance(a, ndarray) else a
    return ndarray(numpy.array(data, dtype=dtype, order=order, copy=not isinstance(a, ndarray) or None))


array = asarray


def asnumpy(a):
    return a.get() if isinstance(a, ndarray) else numpy.asarray(a)


class ufunc:
    """A NumPy ufunc on device arrays, with the methods CuPy 13 has too (add.at, maximum.reduce, ...)."""
    def __init__(self, fn):
        self._fn = fn

    def __call__(self, *args, **kwargs):
        return on_device(self._fn)(*args, **kwargs)

    def __getattr__(self, name):
        value = getattr(self._fn, name)
        return on_device(value) if callable(value) else value


def __getattr__(name):
    """Every other name is NumPy's: functions run on device arrays, dtypes and constants pass through."""
    value = getattr(numpy, name)
    if isinstance(value, numpy.ufunc):
        return ufunc(value)
    return on_device(value) if callable(value) and not isinstance(value, type) else value


class _Stream:
    def synchronize(self):
        pass


class _Device:
    def __init__(self, index=0):
        self.id = index

    def use(self):
        pass


cuda = types.SimpleNamespace(get_current_stream=_Stream, Device=_Device,
                             runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))
