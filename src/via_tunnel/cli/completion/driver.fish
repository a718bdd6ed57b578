# Interfaces: those named in the config file first, then the machine's; each once.
function __via_tunnel_ifaces
    set -l conf /etc/via-tunnel/config.toml
    set -q VIA_TUNNEL_CONFIG[1]; and test -n "$VIA_TUNNEL_CONFIG"; and set conf $VIA_TUNNEL_CONFIG
    begin
        test -r $conf; and sed -nE '@SED@' $conf
        ls -1 /sys/class/net 2>/dev/null
    end | awk '!seen[$0]++'
end

function __via_tunnel_value -a kind cur
    switch $kind
        case iface
            __via_tunnel_ifaces
        case file
            __fish_complete_path "$cur"
        case user
            __fish_complete_users
        case 'choice:*'
            string split , -- (string replace choice: '' -- $kind)
    end
end

# Print the candidates for the token at the cursor (NAME<tab>description).
function __via_tunnel_complete
    set -l words (commandline -opc)
    set -l cur (commandline -ct)
    set -l vt_path ''
    set -l __vt_children
    set -l __vt_children_help
    set -l __vt_option_names
    set -l __vt_option_kinds
    set -l __vt_options
    set -l __vt_args
    __via_tunnel_node $vt_path
    set -l pos 1
    set -l i 2
    while test $i -le (count $words)
        set -l w $words[$i]
        set -l kind $__vt_args[$pos]
        if test "$kind" = command -a "$w" = --
            set -l rest
            test $i -lt (count $words); and set rest $words[(math $i + 1)..-1]
            __fish_complete_subcommand --commandline $rest "$cur"
            return
        end
        if string match -qr -- '^-.' $w; and test "$kind" != command
            set -l k (__via_tunnel_optkind $w)
            if test -n "$k"; and not string match -q -- '*=*' $w
                if test $i -eq (count $words)
                    __via_tunnel_value $k "$cur"
                    return
                end
                set i (math $i + 2)
            else
                set i (math $i + 1)
            end
            continue
        end
        # A subcommand, unless `via-tunnel NAME -- CMD` (an interface called NAME).
        set -l next ''
        test $i -lt (count $words); and set next $words[(math $i + 1)]
        if test $pos -eq 1; and contains -- $w $__vt_children
            and not test -z "$vt_path" -a "$next" = --
            set vt_path (string trim -- "$vt_path $w")
            __via_tunnel_node $vt_path
            set i (math $i + 1)
            continue
        end
        if test "$kind" = command
            __fish_complete_subcommand --commandline $words[$i..-1] "$cur"
            return
        end
        set pos (math $pos + 1)
        set i (math $i + 1)
    end
    set -l kind $__vt_args[$pos]
    if test "$kind" = command
        if test -z "$cur"; or string match -q -- '-*' $cur
            printf '%s\t%s\n' -- 'separator before the command'
        else
            __fish_complete_subcommand --commandline "$cur"
        end
        return
    end
    if string match -q -- '-*' $cur
        string join \n -- $__vt_options
        return
    end
    test -n "$kind"; and __via_tunnel_value $kind "$cur"
    test $pos -eq 1; and string join \n -- $__vt_children_help
end

# The kind of option $argv[1] of the current node; prints "flag" for a flag.
function __via_tunnel_optkind --no-scope-shadowing
    set -l k (contains -i -- $argv[1] $__vt_option_names); or return
    echo $__vt_option_kinds[$k]
end

complete -c via-tunnel -f -k -a '(__via_tunnel_complete)'
