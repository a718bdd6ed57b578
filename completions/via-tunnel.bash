# bash completion for via-tunnel
_via_tunnel() {
    local cur prev i
    cur="${COMP_WORDS[COMP_CWORD]}"
    prev="${COMP_WORDS[COMP_CWORD-1]}"
    # After "IFACE --", complete the command line of CMD.
    for ((i = 1; i < COMP_CWORD; i++)); do
        if [[ "${COMP_WORDS[i]}" == "--" ]]; then
            _command_offset $((i + 1))
            return
        fi
    done
    case "$prev" in
        --ipv6) COMPREPLY=($(compgen -W "auto tunnel block" -- "$cur")); return ;;
        --gateway) return ;;
        status) COMPREPLY=($(compgen -W "--json" -- "$cur")); return ;;
        demo) COMPREPLY=($(compgen -W "--keep" -- "$cur")); return ;;
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "--gateway --ipv6 --debug --help --version" -- "$cur"))
        return
    fi
    local ifaces
    ifaces="$(ls /sys/class/net 2>/dev/null)"
    if [[ $COMP_CWORD -eq 1 ]]; then
        COMPREPLY=($(compgen -W "status cleanup demo version $ifaces" -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$ifaces --" -- "$cur"))
    fi
}
complete -F _via_tunnel via-tunnel
