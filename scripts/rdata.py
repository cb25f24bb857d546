"""Reads character vectors out of an R lazy-load database (Rdata.rdb + Rdata.rdx).

R packages store their data sets as a lazy-load DB: the .rdx file is a gzip-compressed serialized
list whose `variables` element maps each name to (offset, length) in the .rdb file; each .rdb blob
is a 4-byte big-endian uncompressed length followed by a zlib stream holding one serialized object.
The reader below understands the XDR ("X\\n") serialization format, versions 2 and 3, for the
object types a data package uses; anything else raises ValueError rather than guessing.
"""

import gzip
import struct
import zlib

# SEXP type codes and the serializer's pseudo-types (R's serialize.c).
SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 1, 2, 3, 4, 5, 6
CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP, VECSXP, EXPRSXP = 9, 10, 13, 14, 15, 16, 19, 20
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP = 255, 254, 253, 252, 251
BASENAMESPACE_SXP, EMPTYENV_SXP, BASEENV_SXP = 250, 242, 241
ATTRLANGSXP, ATTRLISTSXP = 240, 239
NA_STRING_LENGTH = -1


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.refs = []

    def read_bytes(self, n):
        chunk = self.data[self.pos : self.pos + n]
        if len(chunk) != n:
            raise ValueError("R serialization: unexpected end of data")
        self.pos += n
        return chunk

    def read_int(self):
        return struct.unpack(">i", self.read_bytes(4))[0]

    def header(self):
        if self.read_bytes(2) != b"X\n":
            raise ValueError("R serialization: only the XDR binary format is supported")
        version = self.read_int()
        self.read_int()  # writer's R version
        self.read_int()  # minimal reader version
        if version == 3:
            self.read_bytes(self.read_int())  # native encoding name
        elif version != 2:
            raise ValueError(f"R serialization: unsupported version {version}")

    def item(self):
        flags = self.read_int()
        kind = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if kind in (NILVALUE_SXP, EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP,
                    MISSINGARG_SXP, BASENAMESPACE_SXP):
            return None
        if kind == REFSXP:
            index = flags >> 8 or self.read_int()
            return self.refs[index - 1]
        if kind == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == ENVSXP:
            env = {}
            self.refs.append(env)
            self.read_int()  # locked
            for _ in range(4):  # enclosure, frame, hash table, attributes
                self.item()
            return env
        if kind in (LISTSXP, LANGSXP, CLOSXP, PROMSXP, ATTRLANGSXP, ATTRLISTSXP):
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            head = self.item()
            tail = self.item()
            return [(tag, head)] + (tail or [])
        if kind == CHARSXP:
            length = self.read_int()
            return None if length == NA_STRING_LENGTH else self.read_bytes(length).decode("utf-8", "replace")
        n = self.read_int()
        if kind in (LGLSXP, INTSXP):
            value = list(struct.unpack(f">{n}i", self.read_bytes(4 * n)))
        elif kind == REALSXP:
            value = list(struct.unpack(f">{n}d", self.read_bytes(8 * n)))
        elif kind == CPLXSXP:
            value = list(struct.unpack(f">{2 * n}d", self.read_bytes(16 * n)))
        elif kind in (STRSXP, VECSXP, EXPRSXP):
            value = [self.item() for _ in range(n)]
        else:
            raise ValueError(f"R serialization: unsupported object type {kind}")
        attrs = dict(self.item()) if has_attr else {}
        # A named list (like the .rdx index) becomes a dict; data vectors stay lists.
        if kind == VECSXP and "names" in attrs:
            return dict(zip(attrs["names"], value))
        return value


def _unserialize(data: bytes):
    reader = _Reader(data)
    reader.header()
    return reader.item()


def read_lazyload_db(rdx_path: str, rdb_path: str) -> dict:
    """Returns {name: object} for every variable in the database (character vectors as lists)."""
    with open(rdx_path, "rb") as f:
        index = _unserialize(gzip.decompress(f.read()))
    if index.get("compressed", [True])[0] not in (True, 1):
        raise ValueError(f"{rdb_path}: only zlib-compressed lazy-load databases are supported")
    with open(rdb_path, "rb") as f:
        rdb = f.read()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[int(offset) : int(offset) + int(length)]
        objects[name] = _unserialize(zlib.decompress(blob[4:]))
    return objects
