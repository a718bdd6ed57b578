# Interfaces: those named in the config file first, then the machine's; each once.
_via_tunnel_ifaces() {
    local conf=${VIA_TUNNEL_CONFIG:-/etc/via-tunnel/config.toml}
    {
        [[ -r $conf ]] && sed -nE '@SED@' "$conf"
        ls -1 /sys/class/net 2>/dev/null
    } | awk '!seen[$0]++'
}

# The kind of option $1 of the current node ("" for a flag); fails for an unknown option.
_via_tunnel_optkind() {
    local o
    for o in $vt_opts; do
        if [[ ${o%%=*} == "$1" ]]; then kind=${o#*=}; return 0; fi
    done
    return 1
}

# Append the lines of stdin to COMPREPLY, one candidate each (not split at blanks, not
# expanded as globs).
_via_tunnel_add() {
    mapfile -t -O "${#COMPREPLY[@]}" COMPREPLY
}

# COMPREPLY for a value of this kind.
_via_tunnel_value() {
    local IFS=$'\n'
    case $1 in
        iface) compopt -o nosort 2>/dev/null
               _via_tunnel_add < <(compgen -W "$(_via_tunnel_ifaces)" -- "$cur") ;;
        file) compopt -o filenames 2>/dev/null; _via_tunnel_add < <(compgen -f -- "$cur") ;;
        user) _via_tunnel_add < <(compgen -u -- "$cur") ;;
        choice:*) local choices=${1#choice:}
                  _via_tunnel_add < <(compgen -W "${choices//,/$'\n'}" -- "$cur") ;;
    esac
}

# CMD starts at word $1: hand over to its own completion.
_via_tunnel_handover() {
    if declare -F _command_offset >/dev/null; then
        _command_offset "$1"
    elif (( COMP_CWORD == $1 )); then  # no bash-completion: commands, then file names
        mapfile -t COMPREPLY < <(compgen -c -- "$cur")
    else
        compopt -o filenames 2>/dev/null; mapfile -t COMPREPLY < <(compgen -f -- "$cur")
    fi
}

_via_tunnel() {
    local cur=${COMP_WORDS[COMP_CWORD]} vt_path='' vt_kids vt_opts vt_args kind w i=1 pos=0
    local -a kinds
    COMPREPLY=()
    _via_tunnel_node ''
    while (( i < COMP_CWORD )); do
        w=${COMP_WORDS[i]}
        read -ra kinds <<< "$vt_args"
        kind=${kinds[pos]-}
        if [[ $kind == command && $w == -- ]]; then _via_tunnel_handover $((i + 1)); return; fi
        if [[ $w == -?* && $kind != command ]]; then
            if [[ $w != *=* ]] && _via_tunnel_optkind "$w" && [[ -n $kind ]]; then
                if (( i + 1 == COMP_CWORD )); then _via_tunnel_value "$kind"; return; fi
                (( i += 2 ))
            else
                (( i += 1 ))
            fi
            continue
        fi
        # A subcommand, unless `via-tunnel NAME -- CMD` (an interface called NAME).
        if (( pos == 0 )) && [[ " $vt_kids " == *" $w "* ]] \
                && ! { [[ -z $vt_path ]] && (( i + 1 < COMP_CWORD ))\
                       && [[ ${COMP_WORDS[i + 1]} == -- ]]; }; then
            vt_path=${vt_path:+$vt_path }$w
            _via_tunnel_node "$vt_path"
            (( i += 1 ))
            continue
        fi
        if [[ $kind == command ]]; then _via_tunnel_handover "$i"; return; fi
        (( pos += 1, i += 1 ))
    done
    read -ra kinds <<< "$vt_args"
    kind=${kinds[pos]-}
    if [[ $kind == command ]]; then
        if [[ -z $cur || $cur == -* ]]; then COMPREPLY=(--); else _via_tunnel_handover "$i"; fi
        return
    fi
    if [[ $cur == -* ]]; then
        local o names=
        for o in $vt_opts; do names+=" ${o%%=*}"; done
        mapfile -t COMPREPLY < <(compgen -W "$names" -- "$cur")
        return
    fi
    _via_tunnel_value "$kind"
    (( pos == 0 )) && _via_tunnel_add < <(compgen -W "$vt_kids" -- "$cur")
}
complete -F _via_tunnel via-tunnel
