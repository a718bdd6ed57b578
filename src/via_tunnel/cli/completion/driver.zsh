# Interfaces: those named in the config file first, then the machine's; each once.
_via_tunnel_ifaces() {
    local conf=${VIA_TUNNEL_CONFIG:-/etc/via-tunnel/config.toml}
    {
        [[ -r $conf ]] && sed -nE '@SED@' "$conf"
        ls -1 /sys/class/net 2>/dev/null
    } | awk '!seen[$0]++'
}

# Offer a value of kind $1.
_via_tunnel_value() {
    local -a items expl
    case $1 in
        iface) items=(${(f)"$(_via_tunnel_ifaces)"})
               _wanted -V interfaces expl 'interface (configured first)' compadd -a items ;;
        file) _files ;;
        user) _users ;;
        choice:*) items=(${(s:,:)1#choice:}); _wanted values expl value compadd -a items ;;
        *) _message 'value' ;;
    esac
}

_via_tunnel() {
    local vt_path= vt_kids vt_opts vt_args kind w i=2 pos=0 o
    local -a kinds opts kids expl
    local -A optkind
    _via_tunnel_load() {
        _via_tunnel_node "$1"
        optkind=()
        for o in ${=vt_opts}; do optkind[${o%%=*}]=${o#*=}; done
    }
    _via_tunnel_load ''
    while (( i < CURRENT )); do
        w=${words[i]}
        kinds=(${=vt_args})
        kind=${kinds[pos + 1]-}
        if [[ $kind == command && $w == -- ]]; then
            words=("${(@)words[i + 1,-1]}"); (( CURRENT -= i )); _normal; return
        fi
        if [[ $w == -?* && $kind != command ]]; then
            if [[ $w != *=* && -n ${optkind[$w]-} ]]; then
                if (( i + 1 == CURRENT )); then _via_tunnel_value ${optkind[$w]}; return; fi
                (( i += 2 ))
            else
                (( i += 1 ))
            fi
            continue
        fi
        # A subcommand, unless `via-tunnel NAME -- CMD` (an interface called NAME).
        if (( pos == 0 )) && [[ " $vt_kids " == *" $w "* ]] \
                && ! { [[ -z $vt_path ]] && (( i + 1 < CURRENT ))\
                       && [[ ${words[i + 1]} == -- ]]; }; then
            vt_path=${vt_path:+$vt_path }$w
            _via_tunnel_load "$vt_path"
            (( i += 1 ))
            continue
        fi
        if [[ $kind == command ]]; then
            words=("${(@)words[i,-1]}"); (( CURRENT -= i - 1 )); _normal; return
        fi
        (( pos += 1, i += 1 ))
    done
    kinds=(${=vt_args})
    kind=${kinds[pos + 1]-}
    local cur=${words[CURRENT]}
    if [[ $kind == command ]]; then
        if [[ -z $cur || $cur == -* ]]; then
            _wanted separators expl 'separator before the command' compadd -- --
        else
            words=("${(@)words[CURRENT,-1]}"); CURRENT=1; _normal
        fi
        return
    fi
    if [[ $cur == -* ]]; then
        opts=()
        for o in ${=vt_opts}; do opts+=("${o%%=*}:${_via_tunnel_help[$vt_path ${o%%=*}]-}"); done
        _describe -t options option opts
        return
    fi
    local ret=1
    if [[ -n $kind ]]; then _via_tunnel_value $kind && ret=0; fi
    if (( pos == 0 )) && [[ -n $vt_kids ]]; then
        kids=()
        for o in ${=vt_kids}; do kids+=("$o:${_via_tunnel_help[${vt_path:+$vt_path }$o]-}"); done
        _describe -t commands command kids && ret=0
    fi
    return ret
}

if [[ $funcstack[1] == _via-tunnel ]]; then  # autoloaded by compinit
    _via_tunnel "$@"
else  # sourced
    compdef _via_tunnel via-tunnel
fi
