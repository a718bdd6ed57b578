# fish completion for via-tunnel
complete -c via-tunnel -f
complete -c via-tunnel -n '__fish_is_first_arg' -a 'status cleanup demo version daemon desktop gateway'
complete -c via-tunnel -n '__fish_is_first_arg' -a '(__fish_print_interfaces)'
complete -c via-tunnel -l gateway -r -d 'next hop on a broadcast interface'
complete -c via-tunnel -l ipv6 -x -a 'auto tunnel block' -d 'IPv6 policy'
complete -c via-tunnel -l debug -d 'show tracebacks'
complete -c via-tunnel -l dns -r -d 'resolver for the group'
complete -c via-tunnel -l user -x -a '(__fish_complete_users)' -d 'run CMD as this user'
complete -c via-tunnel -n '__fish_seen_subcommand_from gateway' -a 'up down status'
complete -c via-tunnel -n '__fish_seen_subcommand_from desktop' -a 'install remove list'
complete -c via-tunnel -n '__fish_seen_subcommand_from gateway' -l wan -x -a '(__fish_print_interfaces)'
complete -c via-tunnel -n '__fish_seen_subcommand_from gateway' -l subnet -r
complete -c via-tunnel -n '__fish_seen_subcommand_from gateway' -l forward -r
complete -c via-tunnel -n '__fish_seen_subcommand_from status' -l json
complete -c via-tunnel -n 'contains -- -- (commandline -opc)' -a '(__fish_complete_subcommand --fcs-skip=3)'
