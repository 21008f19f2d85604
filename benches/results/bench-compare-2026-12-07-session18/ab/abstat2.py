import json,sys,glob,statistics as st,collections
d=sys.argv[1]
rows=collections.defaultdict(list)
for f in sorted(glob.glob(d+'/*.jsonl')):
    name=f.split('/')[-1].rsplit('-',1)[0]
    for l in open(f):
        j=json.loads(l)
        if j.get('kind')!='run': continue
        r=j['run']
        if r['engine']!='ferry': continue
        er=r.get('engine_report') or {}
        dp=er.get('downtime_parts') or {}
        fr=er.get('final_round') or {}
        lvl=r['workload']['level'] if isinstance(r['workload'],dict) else r['workload']
        rows[(lvl,name)].append(dict(t=r['total_ms'],dn=r['downtime_ms'],hb=r['heartbeat_gap_ms'],fp=dp.get('final_pages_ms'),rd=er.get('rounds'),fpg=fr.get('pages'),cpu=(r['src_engine_cpu_s'] or 0)+(r['dst_engine_cpu_s'] or 0),st=r['status'],gp=r.get('guest_dirty_rate')))
for k,v in sorted(rows.items()):
    med=lambda key: st.median([x[key] for x in v if x[key] is not None])
    print(k,'n=%d'%len(v),'total %.0f [%s]'%(med('t'),' '.join('%.0f'%x['t'] for x in v if x['t'])),'down %.1f [%s]'%(med('dn'),' '.join('%.1f'%x['dn'] for x in v if x['dn'])),'hb %.1f'%med('hb'),'final_pages_ms [%s]'%' '.join('%.1f'%x['fp'] for x in v if x['fp']),'fpages',[x['fpg'] for x in v],'rounds',[x['rd'] for x in v],'cpu %.2f'%med('cpu'), 'guest',[x['gp'] for x in v][:3])
