# Sourced by launch.sh and slurm.sbatch: the fit arguments of a launch that continues the run when it is
# restarted (resume=auto), unless the arguments already say resume=... or overwrite=true.
fit_args() {
    local arg
    for arg in "$@"; do
        case "$arg" in resume=*|overwrite=true) printf '%s\n' "$@"; return ;; esac
    done
    printf '%s\n' "$@" resume=auto
}
