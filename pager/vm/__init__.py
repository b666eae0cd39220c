"""`ssi-pager vm`: run an unmodified QEMU with all guest RAM behind the pager; suspend, resume.

    ssi-pager vm [--memnode HOST:PORT] [--token-file F] [--space NAME] [--pager SOCKET]
                 [--name NAME] -- qemu-system-x86_64 ARGS...
    ssi-pager vm suspend NAME
    ssi-pager vm resume NAME [--memnode HOST:PORT] [...] -- qemu-system-x86_64 ARGS...

Run: joins the pager listening on ``--pager`` (or starts ``ssi-pager serve`` for this guest),
turns a plain ``-m SIZE`` into a shared ``memory-backend-memfd`` (so the pager and ``suspend``
can read guest RAM), preloads the shim (pager/shim/ssi_shim.c) which hands QEMU's guest RAM to
the pager, adds a QMP socket for ``suspend``, and passes QEMU's exit code through.

Suspend (lazy move, the SSI way): QMP ``stop``; every page the guest ever touched is read from
the RAM memfd and stored in the memory node (pages never touched are already there or zero);
migration with the ``x-ignore-shared`` capability writes only device state to a file; ``quit``.
Resume: a new QEMU with ``-incoming defer``, the same RAM block id and size on a fresh backend,
``x-ignore-shared``, ``migrate-incoming`` from the state file, ``cont``: the guest continues at
once and its RAM is served on demand from the memory node (already during the load: QEMU's
main thread reads guest RAM then).

Per-VM state (QMP socket, vm.json, device state) lives in a 0700 runtime directory:
$SSI_PAGER_RUNTIME_DIR, else $XDG_RUNTIME_DIR/ssi-pager/vm/NAME, else /run/ssi-pager/vm/NAME
(root) or /tmp/ssi-pager-UID/vm/NAME.

One module per concern, each importing only those above it in this list:

    state.py      runtime directory, the per-VM record (vm.json), status lines
    cmdline.py    the user's QEMU command line checked and given a shared RAM backend
    procs.py      helper processes: the pager and memory node a guest needs, stopping them
    qmp.py        QEMU's monitor, through QEMU's own ``qemu.qmp`` library
    ramstore.py   guest RAM and device state to and from a memory node (a page-source lane)
    launch.py     start QEMU behind the pager, wait for the RAM handoff, wait for exit
    suspend.py    ``vm suspend``
    resume.py     ``vm resume``
    cli.py        the ``ssi-pager vm`` command
    bench.py      ``ssi-pager bench vm``
"""
