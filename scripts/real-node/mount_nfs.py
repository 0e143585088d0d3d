"""mount.nfs for the real node (scripts/real-node.sh): mounts an NFSv4.1 export through a userspace NFS
client (nfs-rs) over FUSE (mfusepy, libfuse3), because this machine's kernel has no NFS client.

    mount_nfs.py SERVER:/EXPORT DIR [-o OPTIONS]       the mount.nfs helper's calling convention

The kubelet's NFS volume plugin runs `mount -t nfs -o OPTIONS SERVER:/EXPORT DIR`; the `mount` first on
the kubelet's PATH (scripts/real-node/bin/mount) hands that here. This process starts the FUSE daemon
(the same program with --daemon, in a session of its own, its output in a log beside the state folder),
waits until DIR is mounted or the daemon says why not, and exits: 0 mounted, 32 failed (mount(8)'s code).
The daemon outlives it and ends when DIR is unmounted (`umount DIR`, which the kubelet runs).

What a cloud node does instead: the kernel's NFS client. What this one maps of mount(8)'s NFS options:
  nfsvers / vers   4.1 (also 4.0 and 3, which the project's server does not offer); 4 means 4.1
  hard (default)   an operation the server does not answer is retried until it does, across server
                   restarts (reconnect, open files opened again by path)
  soft, timeo, retrans   soft: give up with EIO after timeo/10 x (retrans + 1) seconds (timeo 600, retrans 2)
  port             the server's port (2049)
  ro / rw          a read-only or read-write FUSE mount
Accepted and ignored (said in the log): rsize, wsize (the client negotiates them), proto=tcp, sec=sys
(the only ones it has), noatime, relatime, nolock, noac, actimeo and the other cache options (FUSE caches
attributes for one second), and anything else mount(8) passes that is not above.
Identity: each caller's uid and gid travel as AUTH_SYS credentials (one NFS session per uid/gid), so the
server decides permissions and records owners as the kernel client would.
"""

import argparse
import errno
import os
import select
import stat
import subprocess
import sys
import threading
import time

EXIT_MOUNT_FAILED = 32
IGNORED = {"rsize", "wsize", "proto", "sec", "noatime", "relatime", "atime", "nolock", "lock", "noac", "ac",
           "actimeo", "acregmin", "acregmax", "acdirmin", "acdirmax", "intr", "nointr", "noresvport", "resvport",
           "namlen", "mountproto", "mountport", "clientaddr", "local_lock", "lookupcache", "fsc", "nofsc",
           "nosuid", "nodev", "noexec", "suid", "dev", "exec", "defaults", "_netdev", "sync", "async", "bg", "fg",
           "retry", "nconnect"}
VERSIONS = {"4.1": "4.1", "4": "4.1", "4.0": "4.0", "3": "3"}


class MountError(Exception):
    """A bad argument or option: one line, exit 32."""


def parse_options(text):
    """mount(8)'s comma-separated NFS options -> the settings this client uses, and what it ignores."""
    opts = {"version": "4.1", "hard": True, "timeo": 600, "retrans": 2, "port": 2049, "ro": False}
    ignored = []
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        if key in ("nfsvers", "vers"):
            if value not in VERSIONS:
                raise MountError(f"NFS version {value!r} is not supported (4.1, 4.0 or 3)")
            opts["version"] = VERSIONS[value]
        elif key in ("hard", "soft"):
            opts["hard"] = key == "hard"
        elif key in ("timeo", "retrans", "port"):
            if not value.isdigit() or (key != "retrans" and int(value) == 0):
                raise MountError(f"option {key} needs a positive number, got {value!r}")
            opts[key] = int(value)
        elif key in ("ro", "rw"):
            opts["ro"] = key == "ro"
        elif key in IGNORED:
            ignored.append(item)
        else:
            ignored.append(item)
    return opts, ignored


def split_spec(spec):
    """SERVER:/EXPORT -> (server, parent path to connect to, the export's own name under it).

    The client connects to the export's parent in the server's NFSv4 namespace and works under the
    export's name: nfs-rs 0.8.7 addresses the root it connects to as ".", which NFS-Ganesha refuses
    (NFS4ERR_BADNAME), while every named path works. So the root "/" itself cannot be mounted."""
    server, sep, path = spec.rpartition(":")
    if not sep or not server or not path.startswith("/"):
        raise MountError(f"{spec!r} is not SERVER:/EXPORT")
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise MountError(f"{spec}: mounting the server's root '/' is not supported by this client; "
                         "export a named directory (the project's server exports /exports)")
    if server.startswith("[") and server.endswith("]"):
        server = server[1:-1]
    return server, "/" + "/".join(parts[:-1]), parts[-1]


# --- the daemon --------------------------------------------------------------------------------

def fs_errno(error):
    """The errno a FUSE caller gets for an nfs-rs error."""
    import nfs_rs

    if isinstance(error, OSError) and error.errno:
        return error.errno
    code = getattr(error, "errno", None)
    if isinstance(code, int) and code > 0:
        return code
    name = (getattr(error, "code_name", None) or "").upper()
    for part, number in (("NOTEMPTY", errno.ENOTEMPTY), ("NOSPC", errno.ENOSPC), ("DQUOT", errno.EDQUOT),
                         ("ROFS", errno.EROFS), ("NAMETOOLONG", errno.ENAMETOOLONG), ("XDEV", errno.EXDEV),
                         ("FBIG", errno.EFBIG), ("STALE", errno.ESTALE), ("INVAL", errno.EINVAL),
                         ("ACCESS", errno.EACCES), ("PERM", errno.EPERM), ("NOENT", errno.ENOENT),
                         ("EXIST", errno.EEXIST), ("ISDIR", errno.EISDIR), ("NOTDIR", errno.ENOTDIR)):
        if part in name:
            return number
    for kind, number in ((FileNotFoundError, errno.ENOENT), (FileExistsError, errno.EEXIST),
                         (PermissionError, errno.EACCES), (IsADirectoryError, errno.EISDIR),
                         (NotADirectoryError, errno.ENOTDIR), (NotImplementedError, errno.EOPNOTSUPP),
                         (ValueError, errno.EINVAL), (nfs_rs.NfsTimeoutError, errno.ETIMEDOUT)):
        if isinstance(error, kind):
            return number
    return errno.EIO


def retryable(error):
    """True for what a reconnect can cure: the connection, a timeout, lost server state."""
    import nfs_rs

    if isinstance(error, (nfs_rs.NfsConnectionError, nfs_rs.NfsTimeoutError, nfs_rs.NfsStateLostError,
                          nfs_rs.NfsRetryableError, nfs_rs.NfsMountError, nfs_rs.NfsRpcError,
                          nfs_rs.NfsClientClosedError, ConnectionError, TimeoutError)):
        return True
    action = getattr(error, "recovery_action", None)
    return str(getattr(action, "value", action)) in ("retry", "reopen", "remount")


class Sessions:
    """One nfs-rs client per caller (uid, gid), made again after a failure. `call` runs an operation
    and, for a hard mount, retries it through reconnects until the server answers."""

    def __init__(self, url, prefix, opts, log):
        self.url, self.prefix, self.opts, self.log = url, prefix, opts, log
        self.clients = {}
        self.generation = 0
        self.lock = threading.Lock()
        self.op_timeout = max(1.0, min(opts["timeo"] / 10, 15.0))
        self.soft_limit = opts["timeo"] / 10 * (opts["retrans"] + 1)

    def path(self, fuse_path):
        rel = fuse_path.strip("/")
        return f"{self.prefix}/{rel}" if rel else self.prefix

    def client(self, ids):
        with self.lock:
            entry = self.clients.get(ids)
            if entry is None:
                import nfs_rs

                client = nfs_rs.Client.connect(self.url, uid=ids[0], gid=ids[1], noresvport=True,
                                               nfs_port=self.opts["port"], connect_timeout=self.op_timeout,
                                               operation_timeout=self.op_timeout)
                entry = self.clients[ids] = (client, self.generation)
            return entry

    def drop(self, ids, generation):
        """Forget a failed client (unless another thread already made a new one)."""
        with self.lock:
            entry = self.clients.get(ids)
            if entry is not None and entry[1] == generation:
                del self.clients[ids]
                self.generation += 1
                try:
                    entry[0].close()
                except Exception:  # noqa: BLE001 - a broken client's close may fail too
                    pass

    def call(self, ids, what, fn):
        """fn(client, generation) with reconnects; errors a reconnect cannot cure go to the caller."""
        started = time.monotonic()
        delay = 0.2
        while True:
            generation = None
            try:
                client, generation = self.client(ids)
                return fn(client, generation)
            except Exception as error:  # noqa: BLE001 - sorted below
                if not retryable(error):
                    raise
                if generation is not None:
                    self.drop(ids, generation)
                waited = time.monotonic() - started
                if not self.opts["hard"] and waited >= self.soft_limit:
                    self.log(f"{what}: giving up after {waited:.0f} s (soft mount): {error}")
                    raise OSError(errno.EIO, str(error)) from error
                self.log(f"{what}: {type(error).__name__}: {error}; retrying (server not answering for {waited:.0f} s)")
                time.sleep(delay)
                delay = min(delay * 2, 5.0)


def make_operations(sessions, log):
    import mfusepy
    import nfs_rs

    kinds = {nfs_rs.FileType.FILE: stat.S_IFREG, nfs_rs.FileType.DIRECTORY: stat.S_IFDIR,
             nfs_rs.FileType.SYMLINK: stat.S_IFLNK, nfs_rs.FileType.FIFO: stat.S_IFIFO,
             nfs_rs.FileType.SOCKET: stat.S_IFSOCK, nfs_rs.FileType.BLOCK_DEVICE: stat.S_IFBLK,
             nfs_rs.FileType.CHARACTER_DEVICE: stat.S_IFCHR}

    def caller():
        uid, gid, _pid = mfusepy.fuse_get_context()
        return uid, gid

    class OpenFile:
        """A FUSE file handle: the nfs-rs file, opened again by path after a reconnect."""

        def __init__(self, path, mode, ids):
            self.path, self.mode, self.ids = path, mode, ids
            self.file, self.generation = None, None
            self.lock = threading.Lock()

        def get(self, client, generation):
            with self.lock:
                if self.file is None or self.generation != generation:
                    # Never "w": opening again must not truncate what was written.
                    self.file = client.open(self.path, "rb" if self.mode == "rb" else "r+b")
                    self.generation = generation
                return self.file

        def close(self):
            with self.lock:
                if self.file is not None:
                    try:
                        self.file.close()
                    except Exception:  # noqa: BLE001 - state may be gone with the server
                        pass
                    self.file = None

    class NfsOperations(mfusepy.Operations):
        use_ns = True

        def __init__(self):
            self.files = {}
            self.next_fh = 1
            self.fh_lock = threading.Lock()

        def _do(self, what, path, fn):
            ids = caller()
            try:
                return sessions.call(ids, f"{what} {path}", fn)
            except OSError as error:
                raise mfusepy.FuseOSError(fs_errno(error)) from error
            except Exception as error:  # noqa: BLE001 - every nfs-rs error becomes an errno
                raise mfusepy.FuseOSError(fs_errno(error)) from error

        def _new_handle(self, handle):
            with self.fh_lock:
                fh = self.next_fh
                self.next_fh += 1
                self.files[fh] = handle
            return fh

        def init_with_config(self, conn_info, config_3):
            sessions.ready()

        def getattr(self, path, fh=None):
            info = self._do("stat", path, lambda c, g: c.stat(sessions.path(path)))
            return {"st_mode": kinds.get(info.type, stat.S_IFREG) | (info.mode & 0o7777), "st_nlink": info.nlink,
                    "st_uid": info.uid, "st_gid": info.gid, "st_size": info.size, "st_blocks": (info.used + 511) // 512,
                    "st_atime": info.atime, "st_mtime": info.mtime, "st_ctime": info.ctime, "st_blksize": 131072}

        def readdir(self, path, fh):
            names = self._do("readdir", path, lambda c, g: c.listdir(sessions.path(path)))
            return [".", ".."] + names

        def readlink(self, path):
            return self._do("readlink", path, lambda c, g: c.readlink(sessions.path(path)))

        def mkdir(self, path, mode):
            def fn(c, g):
                try:
                    c.mkdir(sessions.path(path), mode=mode & 0o7777)
                except nfs_rs.NfsUncertainOutcomeError:
                    if not c.exists(sessions.path(path)):
                        raise
            self._do("mkdir", path, fn)
            return 0

        def rmdir(self, path):
            self._do("rmdir", path, lambda c, g: c.rmdir(sessions.path(path)))
            return 0

        def unlink(self, path):
            self._do("unlink", path, lambda c, g: c.unlink(sessions.path(path)))
            return 0

        def symlink(self, target, source):
            self._do("symlink", target, lambda c, g: c.symlink(source, sessions.path(target)))
            return 0

        def rename(self, old, new):
            self._do("rename", old, lambda c, g: c.rename(sessions.path(old), sessions.path(new)))
            return 0

        def link(self, target, source):
            self._do("link", target, lambda c, g: c.link(sessions.path(source), sessions.path(target)))
            return 0

        def chmod(self, path, mode):
            self._do("chmod", path, lambda c, g: c.chmod(sessions.path(path), mode & 0o7777))
            return 0

        def chown(self, path, uid, gid):
            self._do("chown", path, lambda c, g: c.chown(sessions.path(path), uid, gid))
            return 0

        def truncate(self, path, length, fh=None):
            self._do("truncate", path, lambda c, g: c.truncate(sessions.path(path), length))
            return 0

        def utimens(self, path, times=None):
            now = time.time_ns()
            atime, mtime = times if times else (now, now)
            self._do("utimens", path, lambda c, g: c.utime(sessions.path(path), ns=(atime, mtime)))
            return 0

        def statfs(self, path):
            fs = self._do("statfs", path, lambda c, g: c.fs_stat())
            block = 4096
            return {"f_bsize": block, "f_frsize": block, "f_blocks": fs.total_bytes // block,
                    "f_bfree": fs.free_bytes // block, "f_bavail": fs.available_bytes // block,
                    "f_files": fs.total_files, "f_ffree": fs.free_files, "f_favail": fs.available_files,
                    "f_namemax": 255}

        def create(self, path, mode, fi=None):
            flags = fi.flags if fi is not None else os.O_RDWR
            rel = sessions.path(path)

            def fn(c, g):
                if flags & os.O_EXCL and c.exists(rel):
                    raise FileExistsError(errno.EEXIST, "exists", path)
                with c.open(rel, "w+b"):
                    pass
                c.chmod(rel, mode & 0o7777)
            self._do("create", path, fn)
            fi.fh = self._new_handle(OpenFile(rel, "r+b", caller()))
            return 0

        def open(self, path, fi):
            accmode = fi.flags & os.O_ACCMODE
            rel = sessions.path(path)
            handle = OpenFile(rel, "rb" if accmode == os.O_RDONLY else "r+b", caller())
            self._do("open", path, handle.get)  # fails now on a missing file or no permission
            fi.fh = self._new_handle(handle)
            return 0

        # With raw_fi, the file operations get the fuse_file_info itself: its fh is ours.
        def _on_file(self, what, fi, fn):
            """fn(the open nfs-rs file) as the caller that opened it, through reconnects."""
            handle = self.files[fi.fh]
            try:
                return sessions.call(handle.ids, f"{what} {handle.path}", lambda c, g: fn(handle.get(c, g)))
            except Exception as error:  # noqa: BLE001 - as an errno
                raise mfusepy.FuseOSError(fs_errno(error)) from error

        def read(self, path, size, offset, fi):
            return self._on_file("read", fi, lambda f: f.read_at(offset, size))

        def write(self, path, data, offset, fi):
            return self._on_file("write", fi, lambda f: f.write_at(data, offset))

        def release(self, path, fi):
            with self.fh_lock:
                handle = self.files.pop(fi.fh, None)
            if handle is not None:
                handle.close()
            return 0

        def flush(self, path, fi):
            return 0  # nfs-rs returns from a write once it is on stable storage

        def fsync(self, path, datasync, fi):
            return 0

    return NfsOperations()


def run_daemon(spec, target, options, ready_fd):
    """Serve DIR until it is unmounted; tell the waiting mount helper (ready_fd) 'ok' or why not."""
    import mfusepy

    ready = os.fdopen(ready_fd, "w")

    def tell(message):
        if not ready.closed:
            ready.write(message + "\n")
            ready.close()

    def log(message):
        print(f"{time.strftime('%H:%M:%S')} mount_nfs[{os.getpid()}] {spec} on {target}: {message}", flush=True)

    try:
        opts, ignored = parse_options(options)
        server, parent, name = split_spec(spec)
        url = f"nfs://{'[' + server + ']' if ':' in server else server}{parent}?version={opts['version']}"
        sessions = Sessions(url, name, opts, log)
        if ignored:
            log(f"options ignored by this client: {','.join(ignored)}")
        # The mount fails now, as mount(8) would, when the export is unreachable or absent (retried
        # within the soft limit, or 2 minutes for a hard mount: the kernel's default retry=2).
        deadline = time.monotonic() + (sessions.soft_limit if not opts["hard"] else 120)
        while True:
            try:
                client, _ = sessions.client((0, 0))
                info = client.stat(name)
                if info.type.value != "directory":
                    raise MountError(f"{spec} is not a directory")
                break
            except MountError:
                raise
            except Exception as error:  # noqa: BLE001 - reported to the caller
                sessions.clients.clear()
                if not retryable(error) or time.monotonic() >= deadline:
                    raise MountError(f"cannot mount {spec}: {type(error).__name__}: {error}") from error
                time.sleep(1)
        sessions.ready = lambda: tell("ok")
        log(f"mounting (NFSv{opts['version']}, {'hard' if opts['hard'] else 'soft'}, {'ro' if opts['ro'] else 'rw'})")
        mfusepy.FUSE(make_operations(sessions, log), target, raw_fi=True, foreground=True, allow_other=True,
                     ro=opts["ro"], fsname=spec, subtype="nfs4")
        log("unmounted; exiting")
    except Exception as error:  # noqa: BLE001 - one line for the caller and the log
        tell(f"{error}")
        log(f"failed: {error}")
        return EXIT_MOUNT_FAILED
    tell("the FUSE loop ended before the mount was made")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="mount.nfs", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="SERVER:/EXPORT")
    parser.add_argument("dir", help="the mount point")
    parser.add_argument("-o", dest="options", default="", help="mount options, comma-separated")
    for flag in ("-s", "-f", "-n", "-v"):  # mount(8) passes these to helpers; nothing to do for them
        parser.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--daemon", type=int, metavar="FD", help=argparse.SUPPRESS)
    parser.add_argument("--log", help="the daemon's log file (default: DIR's parent's .mount_nfs.log, "
                                      "or MLK_NFS_MOUNT_LOG)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.daemon is not None:
        return run_daemon(args.spec, args.dir, args.options, args.daemon)
    try:
        parse_options(args.options)
        split_spec(args.spec)
    except MountError as error:
        print(f"mount.nfs: {error}", file=sys.stderr)
        return EXIT_MOUNT_FAILED
    target = os.path.abspath(args.dir)
    if not os.path.isdir(target):
        print(f"mount.nfs: mount point {target} does not exist", file=sys.stderr)
        return EXIT_MOUNT_FAILED
    log_path = args.log or os.environ.get("MLK_NFS_MOUNT_LOG") or os.devnull
    read_end, write_end = os.pipe()
    with open(log_path, "ab") as log:
        # The daemon holds none of the caller's descriptors: the kubelet reads this process's output to
        # its end, and would wait for the daemon otherwise.
        subprocess.Popen([sys.executable, os.path.abspath(__file__), args.spec, target, "-o", args.options,
                          "--daemon", str(write_end)], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                         pass_fds=(write_end,), start_new_session=True, close_fds=True)
    os.close(write_end)
    ready, _, _ = select.select([read_end], [], [], 300)
    answer = os.read(read_end, 4096).decode(errors="replace").strip() if ready else "no answer within 300 s"
    os.close(read_end)
    if answer != "ok":
        print(f"mount.nfs: {answer or 'the FUSE daemon ended without mounting'} (log: {log_path})", file=sys.stderr)
        return EXIT_MOUNT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
