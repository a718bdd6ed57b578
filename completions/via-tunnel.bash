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
    local ifaces
    ifaces="$(ls /sys/class/net 2>/dev/null)"
    case "$prev" in
        --ipv6) COMPREPLY=($(compgen -W "auto tunnel block" -- "$cur")); return ;;
        --user) COMPREPLY=($(compgen -u -- "$cur")); return ;;
        --gateway|--dns|--subnet|--forward) return ;;
        --wan) COMPREPLY=($(compgen -W "$ifaces" -- "$cur")); return ;;
        --socket|--config) COMPREPLY=($(compgen -f -- "$cur")); return ;;
    esac
    case "${COMP_WORDS[1]}" in
        status) COMPREPLY=($(compgen -W "--json" -- "$cur")); return ;;
        demo) COMPREPLY=($(compgen -W "--keep" -- "$cur")); return ;;
        daemon) COMPREPLY=($(compgen -W "--socket --config" -- "$cur")); return ;;
        desktop)
            if [[ $COMP_CWORD -eq 2 ]]; then
                COMPREPLY=($(compgen -W "install remove list" -- "$cur"))
            elif [[ $COMP_CWORD -eq 3 ]]; then
                COMPREPLY=($(compgen -f -X '!*.desktop' -- "$cur"))
            else
                COMPREPLY=($(compgen -W "$ifaces" -- "$cur"))
            fi
            return ;;
        gateway)
            if [[ $COMP_CWORD -eq 2 ]]; then
                COMPREPLY=($(compgen -W "up down status" -- "$cur"))
            elif [[ "$cur" == -* ]]; then
                COMPREPLY=($(compgen -W "--wan --subnet --forward --json" -- "$cur"))
            else
                COMPREPLY=($(compgen -W "$ifaces" -- "$cur"))
            fi
            return ;;
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "--gateway --dns --ipv6 --user --debug --help --version" -- "$cur"))
        return
    fi
    if [[ $COMP_CWORD -eq 1 ]]; then
        COMPREPLY=($(compgen -W "status cleanup demo daemon desktop gateway version $ifaces" -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$ifaces --" -- "$cur"))
    fi
}
complete -F _via_tunnel via-tunnel
