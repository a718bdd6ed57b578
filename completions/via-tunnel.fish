# fish completion for via-tunnel
complete -c via-tunnel -f
complete -c via-tunnel -n '__fish_is_first_arg' -a 'status cleanup demo version'
complete -c via-tunnel -n '__fish_is_first_arg' -a '(__fish_print_interfaces)'
complete -c via-tunnel -l gateway -r -d 'next hop on a broadcast interface'
complete -c via-tunnel -l ipv6 -x -a 'auto tunnel block' -d 'IPv6 policy'
complete -c via-tunnel -l debug -d 'show tracebacks'
complete -c via-tunnel -n '__fish_seen_subcommand_from status' -l json
complete -c via-tunnel -n 'contains -- -- (commandline -opc)' -a '(__fish_complete_subcommand --fcs-skip=3)'
