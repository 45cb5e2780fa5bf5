import numpy as np
def test_fill(pool):
    r = pool.map_chunks(lambda o, c: o.__setitem__(..., c.index), (100, 3), dtype="int32", chunks=7)
    assert r[99, 0] == 14
